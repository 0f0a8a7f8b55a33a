"""The post-call webhook: one signed JSON document per finished call, delivered at least once.

Other code emits events through the runtime's ``Webhooks`` (``runtime.webhooks``):

- ``call_ended(call_sid)`` when a call ends for good (not a hand-off: the call goes on elsewhere).
  Nothing waits: a task lets the store's queued writes land, reads the call's record, builds the
  ``call.completed`` document and queues it. With ``settle_s`` (a stream that was lost, which the
  continuation webhook may still resume) it looks again after that long, and queues nothing if
  another stream took the call over (the final end of that stream sends it).
- ``recording_completed(call_sid, fields)`` queues ``recording.completed`` with the recording's
  ``recording_sid`` / ``recording_url`` / ``recording_duration_s`` (from `fields`, else the record).

Each event is queued once (its id is derived from the call and claimed in the store, so a second
emission, on any instance and even after the first was delivered, is a no-op) in the store's
webhook queue (relay/store/webhook_queue.py): on Redis it outlives the instance and any instance
delivers it. Every instance runs one delivery task: it leases the due events, POSTs each to
its URL signed the Standard Webhooks way (relay/webhook_signing.py) and settles it. Timeouts,
connection errors, 408, 429 and 5xx are retried with exponential backoff and jitter
(``RELAY_WEBHOOK_BACKOFF`` doubling up to ``RELAY_WEBHOOK_BACKOFF_MAX``; a ``Retry-After`` is
honoured within that cap) for up to a day after the event was created; other statuses are not
retried (the event is abandoned, and logged). The ``webhook-id`` is the same on every attempt.

``outcome`` of ``call.completed`` (first match wins):

====================  ==============================================================================
``voicemail``         ``answered_by`` is ``machine_start``, ``machine_end_beep``, ``machine_end_silence``
                      or ``machine_end_other`` (answering-machine detection)
``no_answer``         ``status`` ``no-answer``, or end reason ``no_answer``
``busy``              ``status`` ``busy``, or end reason ``busy``
``canceled``          ``status`` ``canceled``
``failed``            ``status`` ``failed``, ``answered_by`` ``fax``, or an end reason
                      ``realtime_unavailable`` / ``realtime_error:…`` (the assistant could not go on)
``transferred``       end reason ``transferred`` (handed to a human)
``caller_hung_up``    end reason ``caller_hung_up``, or ``caller_disconnected`` / ``stream_closed``
                      (the stream went away and no other stream took the call over)
``completed``         any other end: the assistant ended it (``assistant_ended``), the drain's goodbye
                      (``shutdown``), a stream ended for abuse (``media_flood``, ``dtmf_flood``,
                      ``oversized_frame``), …
====================  ==============================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
import random
import time
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from relay.config import Settings
from relay.metrics import Metrics
from relay.profiles import Profiles
from relay.store import Store
from relay.store.base import CallRecord
from relay.store.webhook_queue import LeasedEvent, QueuedEvent
from relay.webhook_signing import signed_headers

log = logging.getLogger("relay.webhooks")

CALL_COMPLETED = "call.completed"
RECORDING_COMPLETED = "recording.completed"
MAX_AGE_S = 24 * 3600.0  # an event not delivered within a day of its creation is abandoned
POLL_S = 0.5  # how often each instance looks for due events
LEASE_MARGIN_S = 5.0  # a lease outlasts the POST's timeout by this much (its settling included)
BATCH = 16  # events leased (and delivered concurrently) at a time
STORE_TIMEOUT_S = 2.0  # each store step of the queue
FLUSH_TIMEOUT_S = 2.0  # for the call's last writes to land before its record is read
ENQUEUE_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # the store unreachable when an event is built
RETRYABLE_STATUSES = frozenset({408, 429})
MACHINE_ANSWERS = frozenset({"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other"})
RECORDING_FIELDS = ("recording_sid", "recording_url", "recording_duration_s")
LATENCY_PREFIX = "m2e_"  # mouth-to-ear figures in the call's record: m2e_{sent,played}_{p50_ms,max_ms,count}


def event_id(event_type: str, call_sid: str, key: str = "") -> str:
    """The ``webhook-id`` of an event: derived from what it is about, so it is queued once."""
    digest = hashlib.sha256(f"{event_type}:{call_sid}:{key}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def outcome(meta: Mapping[str, str]) -> str:
    """What became of the call, from its record (the mapping is in the module docstring)."""
    reason = meta.get("end_reason", "")
    status = meta.get("status", "")
    answered_by = meta.get("answered_by", "")
    if answered_by in MACHINE_ANSWERS:
        return "voicemail"
    if status == "no-answer" or reason == "no_answer":
        return "no_answer"
    if status == "busy" or reason == "busy":
        return "busy"
    if status == "canceled":
        return "canceled"
    if status == "failed" or answered_by == "fax" or reason == "realtime_unavailable":
        return "failed"
    if reason.startswith("realtime_error"):
        return "failed"
    if reason == "transferred":
        return "transferred"
    if reason in ("caller_hung_up", "caller_disconnected", "stream_closed"):
        return "caller_hung_up"
    return "completed"


def _number(raw: str | None) -> float | None:
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def _whole(raw: str) -> int | float | None:
    """A stored figure as a JSON number: an integer when it is one (milliseconds, counts)."""
    value = _number(raw)
    return int(value) if value is not None and value.is_integer() else value


def _duration_s(meta: Mapping[str, str]) -> float | None:
    """From the call's start to its end, across all its streams (a stream's own duration_s covers only
    the last one after a hand-off or a resume)."""
    try:
        elapsed = datetime.fromisoformat(meta["ended"]) - datetime.fromisoformat(meta["started"])
    except (KeyError, ValueError, TypeError):
        return _number(meta.get("duration_s"))
    return round(elapsed.total_seconds(), 1)


def _tool_calls(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tool call with its result (``result`` None when none was recorded), in call order."""
    calls: dict[str, dict[str, Any]] = {}
    for entry in entries:
        call_id = str(entry.get("call_id", ""))
        if entry.get("kind") == "tool_call":
            calls[call_id] = {
                "call_id": call_id,
                "name": entry.get("name"),
                "arguments": entry.get("arguments"),
                "result": None,
            }
        elif entry.get("kind") == "tool_result" and call_id in calls:
            calls[call_id]["result"] = {"output": entry.get("output"), "ok": entry.get("ok")}
    return list(calls.values())


def _recording(meta: Mapping[str, str]) -> dict[str, Any] | None:
    if not any(meta.get(name) for name in RECORDING_FIELDS):
        return None
    return {
        "sid": meta.get("recording_sid") or None,
        "url": meta.get("recording_url") or None,
        "duration_s": _number(meta.get("recording_duration_s")),
    }


def _timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")


def call_completed_document(record: CallRecord, now: float) -> dict[str, Any]:
    """The ``call.completed`` document of a call's stored record (README: "Post-call webhook")."""
    meta = record.meta
    data: dict[str, Any] = {
        "call_sid": record.call_sid,
        "direction": meta.get("direction") or "inbound",
        "from": meta.get("from") or None,
        "to": meta.get("to") or None,
        "profile": meta.get("profile") or None,
        "started": meta.get("started") or None,
        "ended": meta.get("ended") or None,
        "duration_s": _duration_s(meta),
        "end_reason": meta.get("end_reason") or None,
        "outcome": outcome(meta),
        "transcript": record.entries,
        "summary": record.summary,
        "tool_calls": _tool_calls(record.entries),
        "usage": record.usage,
        "cost_usd": _number(meta.get("cost_usd")),
    }
    latency = {k.removeprefix(LATENCY_PREFIX): _whole(v) for k, v in meta.items() if k.startswith(LATENCY_PREFIX)}
    if latency:
        data["mouth_to_ear"] = dict(sorted(latency.items()))
    if meta.get("answered_by"):
        data["answered_by"] = meta["answered_by"]
    recording = _recording(meta)
    if recording is not None:
        data["recording"] = recording
    return {"type": CALL_COMPLETED, "timestamp": _timestamp(now), "data": data}


def recording_completed_document(call_sid: str, fields: Mapping[str, str], now: float) -> dict[str, Any]:
    """The ``recording.completed`` document: the call and its recording."""
    return {
        "type": RECORDING_COMPLETED,
        "timestamp": _timestamp(now),
        "data": {"call_sid": call_sid, "recording": _recording(fields)},
    }


def retry_after_s(raw: str | None, now: float) -> float | None:
    """A ``Retry-After`` header as seconds from `now` (delta-seconds or an HTTP date), None if absent or unusable."""
    if not raw:
        return None
    value = raw.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class Webhooks:
    """Emission and delivery of the relay's webhooks for one process; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        profiles: Profiles,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = store.webhook_queue()
        self.profiles = profiles
        self.metrics = metrics
        self._rng = rng or random.Random()
        self.enabled = bool(settings.webhook_secret) and (
            bool(settings.webhook_url) or any(p.webhook_url for p in [*profiles.by_name.values(), profiles.default])
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deliverer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._in_flight: dict[str, LeasedEvent] = {}  # event id -> its attempt under way here

    # ---- emitting ---------------------------------------------------------------------------

    def url_for(self, profile_name: str | None) -> str | None:
        """Where a call of this profile's events go: the profile's webhook_url, else RELAY_WEBHOOK_URL."""
        profile = self.profiles.by_name.get(profile_name or "") or self.profiles.default
        url = profile.webhook_url if profile.webhook_url is not None else self.settings.webhook_url
        return url or None

    def call_ended(self, call_sid: str, *, settle_s: float = 0.0) -> None:
        """The call ended for good (``settle_s``: unless another stream takes it over within that long);
        queues its ``call.completed`` in the background. Never blocks, never raises."""
        if self.enabled:
            self._spawn(self._call_ended(call_sid, settle_s), f"webhook-call-{call_sid}")

    def recording_completed(self, call_sid: str, fields: Mapping[str, str] | None = None) -> None:
        """Queue ``recording.completed`` for the call (the recording fields from `fields`, else from the
        call's record) in the background. Never blocks, never raises."""
        if self.enabled:
            self._spawn(self._recording_completed(call_sid, fields), f"webhook-recording-{call_sid}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, call_sid: str) -> CallRecord | None:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            return await self.store.get_call(call_sid)

    async def _call_ended(self, call_sid: str, settle_s: float) -> None:
        extra = {"call_sid": call_sid}
        try:
            if settle_s > 0:
                await asyncio.sleep(settle_s)
            await self.store.flush(FLUSH_TIMEOUT_S)
            record = await self._with_retries(lambda: self._record(call_sid), call_sid, "read the call's record")
            if record is None:
                log.warning("no record of the call: no call.completed webhook", extra=extra)
                return
            if settle_s > 0 and (not record.meta.get("ended") or await self._live_elsewhere(call_sid)):
                return  # another stream carries the call on: its own end sends the event
            url = self.url_for(record.meta.get("profile"))
            if url is None:
                return
            now = time.time()
            body = orjson.dumps(call_completed_document(record, now))
            await self._enqueue(QueuedEvent(event_id(CALL_COMPLETED, call_sid), CALL_COMPLETED, url, body, now))
        except Exception:
            log.exception("could not queue the call.completed webhook", extra=extra)

    async def _live_elsewhere(self, call_sid: str) -> bool:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                return await self.store.live_owner(call_sid) is not None
        except Exception:
            return False

    async def _recording_completed(self, call_sid: str, fields: Mapping[str, str] | None) -> None:
        extra = {"call_sid": call_sid}
        try:
            profile: str | None = None
            if fields is None or not fields:
                await self.store.flush(FLUSH_TIMEOUT_S)
                record = await self._with_retries(lambda: self._record(call_sid), call_sid, "read the call's record")
                fields = record.meta if record is not None else {}
                profile = record.meta.get("profile") if record is not None else None
            else:
                with contextlib.suppress(Exception):
                    record = await self._record(call_sid)
                    profile = record.meta.get("profile") if record is not None else None
            url = self.url_for(profile)
            if url is None or _recording(fields) is None:
                return
            now = time.time()
            body = orjson.dumps(recording_completed_document(call_sid, fields, now))
            key = fields.get("recording_sid") or fields.get("recording_url") or ""
            await self._enqueue(
                QueuedEvent(event_id(RECORDING_COMPLETED, call_sid, key), RECORDING_COMPLETED, url, body, now)
            )
        except Exception:
            log.exception("could not queue the recording.completed webhook", extra=extra)

    async def _enqueue(self, event: QueuedEvent) -> None:
        """Queue the event unless it was queued before (across instances, also when already delivered)."""

        async def claim() -> bool:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                return await self.store.claim_once(f"webhook:{event.id}", self.settings.state_ttl_s)

        async def put() -> bool:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                return await self.queue.enqueue(event, event.created)

        call_sid = orjson.loads(event.body)["data"]["call_sid"]
        if not await self._with_retries(claim, call_sid, f"claim the {event.type} webhook"):
            log.info("%s webhook was queued before; not again", event.type, extra={"call_sid": call_sid})
            return
        if await self._with_retries(put, call_sid, f"queue the {event.type} webhook"):
            log.info("%s webhook queued", event.type, extra={"call_sid": call_sid, "webhook_id": event.id})
            self._wake.set()

    async def _with_retries(self, step: Any, call_sid: str, what: str) -> Any:
        """A store step, retried while the store does not answer (the event exists nowhere else yet)."""
        for delay in (*ENQUEUE_RETRY_S, None):
            try:
                return await step()
            except Exception as exc:
                if delay is None:
                    raise
                log.warning(
                    "could not %s (%s); retrying in %.1f s",
                    what,
                    type(exc).__name__,
                    delay,
                    extra={"call_sid": call_sid},
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ---- delivering -------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._deliverer is None:
            self._client = httpx.AsyncClient(
                timeout=self.settings.webhook_timeout_s, follow_redirects=False, trust_env=False
            )
            self._deliverer = asyncio.create_task(self._deliver_forever(), name="webhook-delivery")

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Let events being built reach the queue (within `timeout_s`), then stop delivering. A delivery
        cut short is made due again at once, for any instance (this one after a restart)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        cut_short = list(self._in_flight.values())
        for task in [*self._tasks, self._deliverer]:
            if task is not None:
                task.cancel()
        if self._deliverer is not None:
            with contextlib.suppress(BaseException):
                await self._deliverer
        self._deliverer = None
        for leased in cut_short:  # fenced by the attempt: one that was settled meanwhile stays settled
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STORE_TIMEOUT_S):
                    await self.queue.retry(leased.event.id, leased.attempt, time.time())
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _deliver_forever(self) -> None:
        failing = False
        while True:
            try:
                leased = await self._lease()
                if failing:
                    log.info("the webhook queue answers again")
                failing = False
                if leased:
                    await asyncio.gather(*(self._deliver(item) for item in leased))
                    continue  # there may be more due at once
                self.metrics.webhook_queue_depth.set(await self._depth())
            except Exception as exc:
                if not failing:
                    log.warning("the webhook queue is unavailable (%s); deliveries wait", type(exc).__name__)
                failing = True
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _lease(self) -> list[LeasedEvent]:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            lease_s = self.settings.webhook_timeout_s + LEASE_MARGIN_S
            return await self.queue.lease(time.time(), lease_s, BATCH)

    async def _depth(self) -> int:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            return await self.queue.depth()

    async def _deliver(self, leased: LeasedEvent) -> None:
        self._in_flight[leased.event.id] = leased
        try:
            await self._attempt(leased)
        finally:
            self._in_flight.pop(leased.event.id, None)

    async def _attempt(self, leased: LeasedEvent) -> None:
        event, attempt = leased.event, leased.attempt
        extra: dict[str, Any] = {"webhook_id": event.id, "event_type": event.type, "attempt": attempt}
        with contextlib.suppress(Exception):
            extra["call_sid"] = orjson.loads(event.body)["data"]["call_sid"]
        started = time.time()
        headers = signed_headers(self.settings.webhook_secret, event.id, int(started), event.body)
        assert self._client is not None
        retry_after: float | None = None
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):  # the whole attempt, not each read
                response = await self._client.post(event.url, content=event.body, headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            failure = "timeout"
        except httpx.HTTPError as exc:
            failure = "connect_error" if isinstance(exc, httpx.TransportError) else type(exc).__name__
        else:
            status = response.status_code
            extra["status"] = status
            if 200 <= status < 300:
                await self._settle(leased, extra)
                self.metrics.webhook_delivered(event.type)
                log.info("%s webhook delivered (attempt %d)", event.type, attempt, extra=extra)
                return
            if status < 500 and status not in RETRYABLE_STATUSES:
                await self._settle(leased, extra)
                self.metrics.webhook_abandoned(f"status_{status}")
                log.error("%s webhook refused with %d: not retried", event.type, status, extra=extra)
                return
            failure = f"status_{status}"
            retry_after = retry_after_s(response.headers.get("retry-after"), time.time())
        await self._retry(leased, failure, retry_after, extra)

    async def _retry(self, leased: LeasedEvent, failure: str, retry_after: float | None, extra: dict[str, Any]) -> None:
        event, attempt = leased.event, leased.attempt
        now = time.time()
        cap = self.settings.webhook_backoff_max_s
        if retry_after is not None:
            delay = min(cap, retry_after)
        else:
            backoff = min(cap, self.settings.webhook_backoff_s * 2 ** min(attempt - 1, 40))
            delay = backoff * self._rng.uniform(0.5, 1.0)
        if now + delay > event.created + MAX_AGE_S:
            await self._settle(leased, extra)
            self.metrics.webhook_abandoned("expired")
            log.error(
                "%s webhook abandoned after %d attempts over %.0f s (last: %s)",
                event.type,
                attempt,
                now - event.created,
                failure,
                extra=extra,
            )
            return
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.queue.retry(event.id, attempt, now + delay)
        except Exception as exc:  # the lease runs out instead, and the event is due again then
            log.warning("could not reschedule the webhook (%s)", type(exc).__name__, extra=extra)
        self.metrics.webhook_retried(failure)
        log.warning(
            "%s webhook attempt %d failed (%s); retrying in %.2f s", event.type, attempt, failure, delay, extra=extra
        )

    async def _settle(self, leased: LeasedEvent, extra: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                if not await self.queue.settle(leased.event.id, leased.attempt):
                    log.warning("the webhook's lease had run out; another attempt may follow", extra=extra)
        except Exception as exc:  # it is sent again once its lease ends: at least once
            log.warning("could not remove the webhook from the queue (%s)", type(exc).__name__, extra=extra)
