"""Admission of a Media Stream: from accept to a start message that proves which call it is.

Anyone can open sockets here, so nothing billable happens before the stream's single-use token
(and the upgrade signature, when Twilio sent one) has matched the call and the numbers Twilio
signed for it. Sockets that wait for their start are few and bounded: a new one evicts the one
that waited longest. Whatever a refused socket sent, it costs at most one log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from relay import logs
from relay.logbound import clip
from relay.security import InvalidSignature, StreamGrant, StreamTokenError, check_signature, verify_stream_token
from relay.transport.twilio_socket import CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, TwilioSocket
from relay.twilio import messages as tw
from relay.twilio import twiml

if TYPE_CHECKING:
    from relay.runtime import Runtime

# Before `start` Twilio sends exactly `connected` then `start` (shared/PROTOCOLS.md §3); two frames of
# slack, and a socket that sends more without a valid start is closed.
PRE_START_FRAMES = 4
TOKEN_REUSE_CHECK_TIMEOUT_S = 1.0
OUTBOUND_LINK_WAIT_S = 3.0


@dataclass(frozen=True, slots=True)
class Admitted:
    """A stream whose start message named a call it may carry."""

    start: tw.Start
    grant: StreamGrant
    log: logs.CallLogger  # with the call's and the stream's SIDs
    skipped_note: str  # unreadable frames before the start, for the call's first line ("" if none)


async def refuse(runtime: Runtime, twilio: TwilioSocket, code: int, reason: str, note: str = "") -> None:
    """Refuse a stream before it carries a call. These lines are bounded process-wide per kind of
    refusal (the reason up to its ':'), not per socket."""
    kind = reason.split(":")[0][:40]
    runtime.metrics.calls_refused.labels(kind).inc()
    runtime.stream_refusals.log(kind, logging.WARNING, "stream refused: %s%s", clip(reason, 200), note)
    await twilio.close(code, reason[:100])


class Admission:
    """One socket, from accept until its start message admits it; the runtime may `evict` it meanwhile."""

    def __init__(self, runtime: Runtime, twilio: TwilioSocket) -> None:
        self.runtime = runtime
        self.twilio = twilio
        self._task: asyncio.Task[object] | None = None  # run(), while it waits for the start message
        self._evicted = False
        self._skipped_note = ""

    def evict(self) -> None:
        """Close this socket, still waiting for its start message, to make room for a new one."""
        self._evicted = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> Admitted | None:
        """Accept the socket and wait for an admissible start; None when the socket was refused."""
        runtime = self.runtime
        pending = runtime.pending_streams
        await self.twilio.ws.accept()
        if len(pending) >= runtime.settings.max_pending_streams:
            # Make room by closing the socket that has waited longest. Refusing the new one instead would
            # let a few dozen idle sockets keep every real stream out; a real stream sends its start
            # within milliseconds of connecting, so only sockets that never do are ever closed here.
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.evict()
            runtime.metrics.calls_refused.labels("pending_streams").inc()
            runtime.stream_refusals.log(
                "pending_streams",
                logging.WARNING,
                "stream refused: %d sockets wait for their start message; closing the one waiting longest",
                len(pending) + 1,
            )
        pending[self] = None
        self._task = asyncio.current_task()
        try:
            admitted = await self._await_start()
        except asyncio.CancelledError:
            if not self._evicted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self.twilio.close(CLOSE_POLICY, "too many sockets waiting for start")
            return None
        finally:
            pending.pop(self, None)
        if admitted is None:
            return None
        if runtime.draining:  # checked once the start message names the call, for the log line
            runtime.metrics.calls_refused.labels("draining").inc()
            admitted.log.warning("stream refused: instance draining")
            await self.twilio.close(CLOSE_TRY_AGAIN, "instance draining")
            return None
        return admitted

    async def _refuse(self, code: int, reason: str) -> None:
        await refuse(self.runtime, self.twilio, code, reason, self._skipped_note)

    async def _await_start(self) -> Admitted | None:
        """Up to `PRE_START_FRAMES` frames until a valid start; at most one log line per socket."""
        settings = self.runtime.settings
        receive = self.twilio.receive
        frames = 0
        skipped = 0
        first_problem = ""
        try:
            async with asyncio.timeout(settings.start_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        return None
                    frames += 1
                    if frames > PRE_START_FRAMES:
                        self.runtime.metrics.calls_refused.labels("too many frames before start").inc()
                        self.runtime.stream_refusals.log(
                            "too_many_frames",
                            logging.WARNING,
                            "stream refused: too many frames before start: %d without a start, %d of them "
                            "unreadable (first: %s)",
                            frames - 1,
                            skipped,
                            first_problem or "-",
                        )
                        await self.twilio.close(CLOSE_POLICY, "too many frames before start")
                        return None
                    text = message.get("text")
                    if text is None:
                        problem = "binary frame"
                    elif len(text) > settings.max_twilio_message_bytes:
                        await self._refuse(CLOSE_TOO_BIG, "oversized frame before start")
                        return None
                    else:
                        try:
                            event = tw.parse(text)
                        except tw.MalformedMessage as exc:
                            problem = f"malformed ({clip(exc)})"
                        else:
                            if isinstance(event, tw.Start):
                                self.runtime.pending_streams.pop(self, None)  # no longer one to evict
                                if skipped:  # told on the socket's one line: its refusal or "call started"
                                    self._skipped_note = (
                                        f" ({skipped} frames before start skipped, first: {first_problem})"
                                    )
                                return await self._admit(event)
                            continue  # connected (or an event this relay does not know)
                    skipped += 1
                    first_problem = first_problem or problem
        except TimeoutError:
            await self._refuse(CLOSE_POLICY, "no valid start message in time")
            return None

    async def _outbound_call_sid(self, ref: str) -> str | None:
        """The SID POST /calls linked to `ref`, waiting a little: Twilio may dial before its answer
        to calls.create reached the relay that placed the call."""
        deadline = time.monotonic() + OUTBOUND_LINK_WAIT_S
        while True:
            try:
                async with asyncio.timeout(TOKEN_REUSE_CHECK_TIMEOUT_S):
                    sid = await self.runtime.store.outbound_call_sid(ref)
            except Exception as exc:
                logging.getLogger("relay.transport").warning(
                    "could not look up an outbound call's reference (%s)", type(exc).__name__
                )
                sid = None
            if sid is not None or time.monotonic() >= deadline:
                return sid
            await asyncio.sleep(0.05)

    async def _admit(self, start: tw.Start) -> Admitted | None:
        """The stream token (and the upgrade signature, when present) must match this call and the
        numbers Twilio signed for it; each token admits one stream."""
        settings = self.runtime.settings
        log = logs.call_logger(start.call_sid, start.stream_sid, logs.TRANSPORT_LOGGER)
        logs.bind_call(start.call_sid, start.stream_sid)  # library lines of this call carry the SIDs too
        params = start.custom_parameters
        # An outbound call's token names the reference POST /calls gave it (its SID did not exist yet).
        ref = params.get("outbound", "")
        try:
            grant = verify_stream_token(
                settings.stream_secret,
                ref or start.call_sid,
                params.get("token", ""),
                caller=params.get("from", ""),
                called=params.get("to", ""),
                resumes=params.get("resume") == "1",
            )
        except StreamTokenError as exc:
            await self._refuse(CLOSE_POLICY, f"stream token rejected: {exc}")
            return None
        if ref:
            if await self._outbound_call_sid(ref) != start.call_sid:
                await self._refuse(CLOSE_POLICY, "stream token rejected: not the outbound call it was minted for")
                return None
            grant = replace(grant, call_sid=start.call_sid, outbound=True)
        signature = self.twilio.ws.headers.get("x-twilio-signature")
        if signature and settings.twilio_auth_token and settings.public_url:
            try:
                check_signature(settings.twilio_auth_token, twiml.stream_url(settings.public_url), {}, signature)
            except InvalidSignature as exc:
                await self._refuse(CLOSE_POLICY, f"upgrade signature rejected: {exc}")
                return None
        try:
            first_use = await asyncio.wait_for(
                self.runtime.store.claim_once(
                    f"stream-token:{grant.use_key}", max(60, int(grant.expiry - time.time()) + 60)
                ),
                timeout=TOKEN_REUSE_CHECK_TIMEOUT_S,
            )
        except Exception as exc:  # the store being down must not stop calls; the token still expires
            log.warning("could not check stream token reuse (%s); admitting", type(exc).__name__)
            first_use = True
        if not first_use:
            await self._refuse(CLOSE_POLICY, "stream token already used")
            return None
        return Admitted(start, grant, log, self._skipped_note)
