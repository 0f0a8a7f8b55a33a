"""OpenAI's REST API for SIP calls, through the ``openai`` package's own client: accept, reject,
refer, hang up, and the Standard Webhooks verifier of the project webhook
(/work/shared/PROTOCOLS.md §14, §15). ``OPENAI_API_BASE`` says where the requests go, so tests
(relay/sim/sip) and Azure get exactly what production sends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import openai

from relay.config import Settings
from relay.realtime.endpoint import OFFLINE_KEY
from relay.sip.errors import CallGone, WebhookSignatureInvalid

__all__ = ["CallGone", "SipCalls"]

REST_TIMEOUT_S = 10.0
REST_RETRIES = 2  # the openai client's own retries (connection errors, 408, 429, 5xx), with its backoff
WEBHOOK_TOLERANCE_S = 300  # OpenAI's and the reference library's 5 minutes, past or future


class SipCalls:
    """One client for the process: its HTTP connections are shared by all SIP calls."""

    def __init__(self, settings: Settings) -> None:
        headers: dict[str, str] = {}
        key = settings.openai_api_key
        if settings.provider == "azure":
            key = settings.azure_api_key or settings.azure_ad_token
            if settings.azure_api_key:
                headers["api-key"] = settings.azure_api_key
        self.client = openai.AsyncOpenAI(
            api_key=key or OFFLINE_KEY,
            base_url=settings.openai_api_base,
            webhook_secret=settings.openai_webhook_secret,
            timeout=REST_TIMEOUT_S,
            max_retries=REST_RETRIES,
            default_headers=headers or None,
        )

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Raises ``WebhookSignatureInvalid`` for a bad signature or a stale timestamp and
        ``ValueError`` for missing headers (or no secret)."""
        try:
            self.client.webhooks.verify_signature(body, dict(headers), tolerance=WEBHOOK_TOLERANCE_S)
        except openai.InvalidWebhookSignatureError as exc:
            raise WebhookSignatureInvalid(str(exc)) from None

    async def accept(self, call_id: str, session: Mapping[str, Any]) -> None:
        body = {key: value for key, value in session.items() if key != "type"}
        try:
            await self.client.realtime.calls.accept(call_id, type="realtime", **body)
        except openai.NotFoundError:
            raise CallGone(call_id) from None

    async def reject(self, call_id: str, status_code: int = 486) -> None:
        try:
            await self.client.realtime.calls.reject(call_id, status_code=status_code)
        except openai.NotFoundError:
            raise CallGone(call_id) from None

    async def refer(self, call_id: str, target_uri: str) -> None:
        try:
            await self.client.realtime.calls.refer(call_id, target_uri=target_uri)
        except openai.NotFoundError:
            raise CallGone(call_id) from None

    async def hangup(self, call_id: str) -> None:
        try:
            await self.client.realtime.calls.hangup(call_id)
        except openai.NotFoundError:
            raise CallGone(call_id) from None

    async def close(self) -> None:
        await self.client.close()
