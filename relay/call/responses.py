"""Which response is active, and when a ``response.create`` may go out.

The Realtime API runs one in-band response at a time: a ``response.create`` sent while one is
active is refused with ``conversation_already_has_active_response``. So the call sends at most
one create at a time and queues the rest until ``response.done``:

* a create is *in flight* from sending until its ``response.created`` (or its refusal);
* an interrupted response is *ending* until its ``response.done``: a create sent before that
  would be refused;
* a response created by the server by itself can win the race against ours: ours is refused,
  found again by its ``event_id`` and queued in front, to go out at the next ``response.done``;
* out-of-band responses (``conversation: "none"``, the summary) never become active, and their
  audio, like the late audio of an interrupted or lost response (*dropped*), never reaches Twilio.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from relay.call.effects import Metric, Outbox, UpstreamFailed
from relay.realtime import client
from relay.realtime import events as ev

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

RACED = "conversation_already_has_active_response"
"""The error for a create sent while a response (ours or the server's own) is active."""
QUIET_ERRORS = {
    "response_cancel_not_active": (logging.DEBUG, "cancel raced the end of the response (harmless)"),
    "input_audio_buffer_commit_empty": (
        logging.INFO,
        "the Realtime API found too little caller audio to commit that turn",
    ),
}
"""Errors that are part of normal operation: (log level, line)."""
SENT_CREATES_KEPT = 16
"""Recent creates kept by event_id, to find the one an error refers to."""


def is_out_of_band(create: dict[str, Any]) -> bool:
    return bool(create.get("response", {}).get("conversation") == "none")


class Responses:
    """The response.create queue and the responses of the current session."""

    __slots__ = (
        "_create_seq",
        "_outbox",
        "_sent",
        "active",
        "dropped",
        "ending",
        "had_audio",
        "in_flight",
        "out_of_band",
        "queued",
    )

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self.active: str | None = None
        self.ending: set[str] = set()
        self.out_of_band: set[str] = set()
        self.dropped: set[str] = set()
        self.had_audio: set[str] = set()  # responses whose first audio was already sent
        self.in_flight: dict[str, Any] | None = None
        self._sent: dict[str, dict[str, Any]] = {}  # event_id -> response.create, recent ones
        self.queued: deque[dict[str, Any]] = deque()
        self._create_seq = 0

    @property
    def idle(self) -> bool:
        """Nothing in-band is being generated, asked for or waiting to be asked for."""
        return (
            self.active is None
            and self.in_flight is None
            and not any(not is_out_of_band(queued) for queued in self.queued)
        )

    def has_plain_queued(self) -> bool:
        """A queued create without options: it will answer whatever items are new by then."""
        return any("response" not in queued for queued in self.queued)

    def request(self, create: dict[str, Any], *, session_ready: bool) -> None:
        """Send `create` now, or once the current response is done (never two at once)."""
        self._create_seq += 1
        create["event_id"] = f"relay_create_{self._create_seq}"
        if not session_ready:
            self.queued.append(create)
            return
        if self.active is None and self.in_flight is None and not self.ending:
            self._send(create)
            return
        if "response" not in create and self.has_plain_queued():
            return  # one plain response will see every new item; don't ask twice
        self.queued.append(create)

    def flush(self, *, session_ready: bool) -> None:
        """Send the next queued create if nothing stands in its way."""
        if session_ready and self.queued and self.active is None:
            if self.in_flight is None and not self.ending:
                self._send(self.queued.popleft())

    def _send(self, create: dict[str, Any]) -> None:
        self.in_flight = create
        self._sent[create["event_id"]] = create
        while len(self._sent) > SENT_CREATES_KEPT:
            del self._sent[next(iter(self._sent))]
        self._outbox.send_upstream(create)

    def cut_active(self, *, cancel: bool) -> str | None:
        """Stop the active response (barge-in, an urgent announcement): its late audio is dropped
        and creates wait for its response.done. Sends ``response.cancel`` when `cancel`."""
        response_id = self.active
        if response_id is None:
            return None
        self.dropped.add(response_id)
        self.ending.add(response_id)
        if cancel:
            self._outbox.send_upstream(client.cancel(response_id))
        self.active = None
        return response_id

    def created(self, response_id: str, *, out_of_band: bool) -> None:
        """response.created: ours, or one the server started by itself. If the latter, ours is
        refused with "already has an active response" and queued again by its event_id."""
        if out_of_band:
            self.out_of_band.add(response_id)
            if self.in_flight is not None and is_out_of_band(self.in_flight):
                self.in_flight = None
            return
        self.in_flight = None
        self.active = response_id

    def done(self, response_id: str) -> bool:
        """response.done; True when it was an out-of-band response."""
        if response_id in self.out_of_band:
            self.out_of_band.discard(response_id)
            return True
        self.ending.discard(response_id)
        if self.active == response_id or self.active is None:
            self.active = None
        return False

    def refused(self, event_id: str | None, *, raced: bool) -> dict[str, Any] | None:
        """An error naming `event_id`: the create it refused is no longer in flight. If it `raced`
        a response (one the server started, or one this call does not count as active), it goes
        out first at the next response.done: sending it again now could only draw the same error,
        again and again. Returns the create given up for good, or None."""
        create = self._sent.pop(event_id, None) if event_id else None
        if create is None:
            return None
        if self.in_flight is create:
            self.in_flight = None
        if raced:
            if create not in self.queued:
                self.queued.appendleft(create)
            return None
        return create

    def server_error(self, error: ev.ServerError, log: Logger, *, session_ready: bool) -> bool:
        """An ``error`` event: counted, logged at its level, and the create it refused re-queued
        (a race) or given up; a fatal one, or an expired session, becomes `UpstreamFailed` (the
        transport closes the session). True when the create given up was the out-of-band summary's."""
        code = error.code or error.type
        effects = self._outbox.effects
        effects.append(Metric("realtime_errors", 1.0, code))
        quiet = QUIET_ERRORS.get(code)
        if quiet is not None:
            log.log(*quiet)
            return False
        refused = self.refused(error.event_id, raced=code == RACED)
        if code == RACED:
            log.info("response.create raced an active response; queued until it is done")
            return False
        if refused is not None:
            self.flush(session_ready=session_ready)
        fatal = code in ev.FATAL_ERROR_CODES
        if fatal or code in ("session_expired", "session_expiration"):
            effects.append(UpstreamFailed(code, error.message, fatal))
        log.warning("Realtime error %s: %s", code, error.message)
        return refused is not None and is_out_of_band(refused)

    def session_opened(self) -> None:
        """A new session has no responses; queued creates wait for it to be ready."""
        self.active = None
        self.ending.clear()
        self.out_of_band.clear()
        self.in_flight = None

    def session_lost(self) -> None:
        """Whatever the lost session was generating will never finish, nor be answered."""
        if self.active:
            self.dropped.add(self.active)
        self.active = None
        self.ending.clear()
        self.in_flight = None
        self.queued.clear()
