"""Call control through Twilio's REST API: hang up, redirect to new TwiML, place a call, record one.

The official client is synchronous; calls run in a worker thread so audio never waits.
``TWILIO_API_BASE`` points the client at another host (a local recorder in tests)
without changing the method, path or form it sends.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client


class _RebasedHttpClient(TwilioHttpClient):  # type: ignore[misc]
    """Sends every request to ``base`` (scheme and host) keeping path and query."""

    def __init__(self, base: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._base = urlsplit(base)

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        url = urlunsplit((self._base.scheme, self._base.netloc, parts.path, parts.query, ""))
        return super().request(method, url, *args, **kwargs)


class TwilioControl:
    def __init__(self, account_sid: str, auth_token: str, *, api_base: str | None = None, timeout: float = 10.0):
        http_client = _RebasedHttpClient(api_base, timeout) if api_base else TwilioHttpClient(timeout=timeout)
        self.client = Client(account_sid, auth_token, http_client=http_client)

    async def hangup(self, call_sid: str) -> None:
        await asyncio.to_thread(lambda: self.client.calls(call_sid).update(status="completed"))

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace the live call's TwiML (ends the <Connect><Stream>)."""
        await asyncio.to_thread(lambda: self.client.calls(call_sid).update(twiml=twiml))

    async def place_call(self, **create: Any) -> tuple[str, str]:
        """``calls.create`` with these arguments; the new call's SID and status."""
        call = await asyncio.to_thread(lambda: self.client.calls.create(**create))
        return str(call.sid), str(call.status)

    async def start_recording(self, call_sid: str, *, channels: str, status_callback: str) -> str:
        """Record the live call from now on (``recordings.create``); the recording's SID."""
        recording = await asyncio.to_thread(
            lambda: self.client.calls(call_sid).recordings.create(
                recording_channels=channels,
                recording_status_callback=status_callback,
                recording_status_callback_event=["completed"],
                recording_status_callback_method="POST",
            )
        )
        return str(recording.sid)
