"""Everything one relay process shares between its calls, created at start-up."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import logging
import os
import socket
import time
from collections.abc import Coroutine, Mapping
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode, urlsplit

import orjson

from relay import logs
from relay.agent_settings import AgentSettings
from relay.caller_memory import LaterMemory
from relay.config import INSECURE_STREAM_SECRET, Settings
from relay.logbound import RepeatLimiter
from relay.metrics import Metrics
from relay.ownership import Ownership
from relay.profiles import Profiles, load_profiles
from relay.realtime.dialect import Dialect, get_dialect
from relay.realtime.models import shutdown_notice
from relay.security import parse_expiry
from relay.store import Store, make_store
from relay.store.base import LIVE_HEARTBEAT_S, LIVE_TTL_S
from relay.tools import ToolRegistry, whisper_text
from relay.twilio.rest import TwilioControl
from relay.webhooks import Webhooks

if TYPE_CHECKING:
    from relay.sip.calls import SipCalls

log = logging.getLogger("relay.runtime")
DRAIN_GOODBYE = "Sorry, we have to end this call for maintenance. Please call back. Goodbye."
# After DRAIN_SECONDS: goodbye (generated and played) + teardown + uvicorn shutdown + store flush
# stay under the 10 s margin the deployment gives (terminationGracePeriodSeconds, infra/DEPLOY.md).
DRAIN_GOODBYE_TIMEOUT_S = 4.5
DRAIN_TEARDOWN_WAIT_S = 1.0  # each call's teardown (final summary, state writes)
HANDOFF_PEER_SETTLE_S = 0.5  # before a hand-off, for peers drained at the same time to say so
METRICS_SYNC_S = 1.0
INSECURE_WARNING_S = 300.0  # RELAY_INSECURE_DEV is repeated in the log this often
STORE_PROBE_S = 2.0  # Redis unreachable at start-up: probed this often until it answers
WHISPER_TTL_S = 300  # a transfer rings for at most a few minutes before the human answers
WHISPER_CLOCK_SKEW_S = 30  # instances' clocks may differ this much


MAX_CALL_MESSAGE_BYTES = 8 * 1024
_RUNTIMES = itertools.count()


class LiveStream(Protocol):
    """What the runtime needs of a call's live stream: its SID, a way to end it with a spoken
    goodbye (drain) or to hand it off, and the commands other instances send it (`tell_call`). Its
    hold across instances is the stream's own (relay/ownership.py)."""

    @property
    def call_sid(self) -> str: ...

    async def goodbye(self, text: str, timeout: float) -> None: ...

    async def hand_off(self, max_wait_s: float) -> bool: ...

    async def command(self, name: str, args: Mapping[str, str]) -> None: ...


class WaitingStream(Protocol):
    """A socket still waiting for its start message; the runtime may close it to make room."""

    def evict(self) -> None: ...


def check_configuration(
    settings: Settings, *, tools: ToolRegistry | None = None, profiles: Profiles | None = None
) -> tuple[ToolRegistry, Profiles]:
    """Load tool modules and agent profiles and check they fit together; raises ConfigError."""
    if tools is None:
        tools = ToolRegistry(settings.tool_timeout_s)
        tools.load_modules(settings.handler_modules)
    profiles = profiles or load_profiles(settings.profiles_file, settings.agent, dialect=settings.dialect)
    profiles.check_tools(tools.tools)
    profiles.check_dialect(settings.dialect)
    profiles.check_webhooks(bool(settings.webhook_secret))
    return tools, profiles


def model_notices(settings: Settings, profiles: Profiles, today: date | None = None) -> list[str]:
    """One warning per configured model (env or profile) with an announced shutdown.

    Not on Azure: there the names are deployments, retired on Azure's own schedule.
    """
    if settings.provider == "azure":
        return []
    base = settings.agent
    checks: list[tuple[str, str | None, str]] = [
        ("realtime", settings.model, "OPENAI_REALTIME_MODEL"),
        ("transcription", base.transcription_model, "RELAY_TRANSCRIPTION_MODEL"),
    ]
    for profile in profiles.by_name.values():
        if profile.model not in (None, settings.model):
            checks.append(("realtime", profile.model, f"profiles.{profile.name}.model"))
        if profile.transcription_model != base.transcription_model:
            checks.append(
                ("transcription", profile.transcription_model, f"profiles.{profile.name}.transcription_model")
            )
    notices = [shutdown_notice(kind, name, where, today) for kind, name, where in checks if name]
    return [notice for notice in notices if notice is not None]


def interface_notices(settings: Settings) -> list[str]:
    """Warnings about a deprecated interface the configuration selects."""
    if settings.dialect != "beta":
        return []
    if settings.provider == "azure":
        return [
            "OPENAI_REALTIME_DIALECT=beta with RELAY_PROVIDER=azure uses Azure's preview Realtime API "
            "(/openai/realtime?api-version=…), deprecated since 2026-04-30; OPENAI_REALTIME_DIALECT=ga "
            "uses the GA form (/openai/v1/realtime)"
        ]
    if urlsplit(settings.realtime_url).hostname == "api.openai.com":
        return [
            "OPENAI_REALTIME_DIALECT=beta: api.openai.com refuses the beta interface "
            "(error beta_api_shape_disabled), so calls will fail; use ga, or point OPENAI_REALTIME_URL "
            "at a server that still speaks beta"
        ]
    return []


def redis_location(url: str | None) -> str:
    """host:port (or the socket path) of a Redis URL, for log lines: never its password."""
    if not url:
        return "-"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    host = parts.hostname or "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        metrics: Metrics | None = None,
        tools: ToolRegistry | None = None,
        profiles: Profiles | None = None,
        twilio_control: TwilioControl | None = None,
    ) -> None:
        self.settings = settings
        self.dialect: Dialect = get_dialect(settings.dialect)
        # Unique per runtime: host and process, and a count when one process runs several (tests, embedding).
        serial = next(_RUNTIMES)
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}" + (f"-{serial}" if serial else "")
        self.metrics = metrics or Metrics()
        self.metrics.set_build_info(settings.dialect, settings.model)
        self.store: Store = store or make_store(
            settings.redis_url,
            prefix=settings.redis_prefix,
            state_ttl_s=settings.state_ttl_s,
            caller_memory_ttl_s=settings.caller_memory_ttl_s,
            queue_size=settings.store_queue_size,
            caller_key_secret=settings.caller_key,
        )
        # which instance holds which call: this instance's heartbeat and the holds of its calls
        self.ownership = Ownership(self.store, self.instance_id, draining=lambda: self.draining)
        # a dropped stream's caller memory waits until no new stream of its call can start: the
        # continuation's token expires, its start message is due, its wait for the old hold is over
        resume_window_s = settings.stream_token_ttl_s + settings.start_timeout_s + LIVE_TTL_S + LIVE_HEARTBEAT_S + 1.0
        self.later_memory = LaterMemory(self.store, resume_window_s, logging.getLogger("relay.call"))
        self.tools, self.profiles = check_configuration(settings, tools=tools, profiles=profiles)
        for notice in [*interface_notices(settings), *model_notices(settings, self.profiles)]:
            log.warning(notice)
        if twilio_control is None and settings.twilio_account_sid and settings.twilio_auth_token:
            twilio_control = TwilioControl(
                settings.twilio_account_sid, settings.twilio_auth_token, api_base=settings.twilio_api_base
            )
        self.twilio_control = twilio_control
        # the post-call webhook: runtime.webhooks.call_ended(sid) / .recording_completed(sid, fields)
        self.webhooks = Webhooks(settings, self.store, self.profiles, self.metrics)
        # SIP mode (relay/sip): on with OPENAI_WEBHOOK_SECRET; each call runs in a task of its own
        self.sip: SipCalls | None = None
        if settings.openai_webhook_secret:
            from relay.sip.calls import SipCalls  # the openai package, only for SIP mode (relay/sip/errors.py)

            self.sip = SipCalls(settings)
        self.sip_tasks: set[asyncio.Task[None]] = set()
        self.calls: dict[str, LiveStream] = {}
        self._commands: set[asyncio.Task[None]] = set()  # tell_call commands running on this instance's calls
        # Media Stream sockets accepted and waiting for their start message, the longest-waiting first
        self.pending_streams: dict[WaitingStream, None] = {}
        self.draining = False
        self.started = False
        self._drain_task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._store_watch_task: asyncio.Task[None] | None = None
        # Anyone can open sockets and POST to the public endpoints: what they are refused for before
        # a call exists is logged the first few times per kind, then as a running count, so a client
        # that keeps trying buys no log lines (relay/logbound.py).
        self.stream_refusals = RepeatLimiter(logging.getLogger(logs.TRANSPORT_LOGGER), scope="since start-up")
        self.request_refusals = RepeatLimiter(logging.getLogger("relay.app"), scope="since start-up")
        self.insecure_warning_interval_s = INSECURE_WARNING_S

    async def start(self) -> None:
        await self.store.start()
        self.later_memory.start()
        self.started = True
        self._metrics_task = asyncio.create_task(self._periodic(), name="runtime-periodic")
        self.ownership.start(self._call_message)
        self.webhooks.start()
        if self.store.kind == "redis":
            self._store_watch_task = asyncio.create_task(self._watch_store(), name="store-watch")

    async def stop(self) -> None:
        for task in (self._metrics_task, self._store_watch_task):
            if task is not None:
                task.cancel()
        self._metrics_task = self._store_watch_task = None
        await self.later_memory.stop()
        if self.sip_tasks:  # calls still being accepted or served when the server stops
            for sip_task in list(self.sip_tasks):
                sip_task.cancel()
            await asyncio.gather(*self.sip_tasks, return_exceptions=True)
        if self.sip is not None:
            await self.sip.close()
        await self.ownership.stop()
        await self.webhooks.stop()
        await self.store.close()
        self.metrics.sync_store(self.store.queue_depth, self.store.dropped_writes)
        self.started = False

    async def _periodic(self) -> None:
        """Store gauges are copied periodically: with several workers any one of them answers a scrape.

        With RELAY_INSECURE_DEV the warning is logged at start-up and again every INSECURE_WARNING_S.
        """
        warned_at: float | None = None
        while True:
            self.metrics.sync_store(self.store.queue_depth, self.store.dropped_writes)
            warning = self.insecure_warning()
            if warning and (warned_at is None or time.monotonic() - warned_at >= self.insecure_warning_interval_s):
                warned_at = time.monotonic()
                log.warning(warning, extra={"insecure_dev": True})
            await asyncio.sleep(METRICS_SYNC_S)

    def insecure_warning(self) -> str | None:
        """What RELAY_INSECURE_DEV turns off in this configuration (None when it is not set)."""
        settings = self.settings
        if not settings.insecure_dev:
            return None
        disabled = []
        if not settings.twilio_auth_token:
            disabled.append("Twilio signature checks on /incoming-call are disabled (no TWILIO_AUTH_TOKEN)")
        if settings.stream_secret == INSECURE_STREAM_SECRET:
            disabled.append("media stream tokens are signed with a publicly known development secret")
        if not disabled:
            disabled.append("start-up would not insist on TWILIO_AUTH_TOKEN")
        return f"RELAY_INSECURE_DEV=1, for local development only: {'; '.join(disabled)}"

    async def _watch_store(self) -> None:
        """Redis unreachable at start-up is one warning (host:port, never the password), then one line
        when it answers; later outages are reported by the store's writer."""
        where = redis_location(self.settings.redis_url)
        down_since: float | None = None
        while not await self.store.ping():
            if down_since is None:
                down_since = time.monotonic()
                log.warning(
                    "redis at %s is unreachable: caller memory, call state and GET /calls are degraded "
                    "and /readyz answers 503 until it answers",
                    where,
                    extra={"redis": where},
                )
            await asyncio.sleep(STORE_PROBE_S)
        if down_since is not None:
            log.info(
                "redis at %s is reachable again after %.1f s",
                where,
                time.monotonic() - down_since,
                extra={"redis": where},
            )

    def start_sip_call(self, call: Coroutine[Any, Any, None], call_id: str) -> asyncio.Task[None]:
        """Serve a SIP call OpenAI offers (relay/transport/sideband.py) in a task of the runtime's: the
        webhook is answered at once, and the task is cancelled when the runtime stops."""
        task = asyncio.create_task(call, name=f"sip-{call_id}")
        self.sip_tasks.add(task)
        task.add_done_callback(self._sip_task_done)
        return task

    def _sip_task_done(self, task: asyncio.Task[None]) -> None:
        self.sip_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("SIP call task %s failed", task.get_name(), exc_info=exc)

    def profile_for(self, called: str) -> AgentSettings:
        return self.profiles.for_number(called) if called else self.profiles.default

    def register(self, stream: LiveStream) -> bool:
        """Count the stream as live here; False (nothing changed) if another stream of its
        call already is. `calls` is keyed by call SID, so it holds one stream per call."""
        current = self.calls.get(stream.call_sid)
        if current is not None and current is not stream:
            return False
        self.calls[stream.call_sid] = stream
        self.metrics.active_calls.set(len(self.calls))
        return True

    async def tell_call(self, call_sid: str, command: Mapping[str, str]) -> bool:
        """Send a command to the call's live stream, on whichever instance holds it (relay/ownership.py);
        False when none does (the call has no stream, or its instance is gone)."""
        message = orjson.dumps({"call_sid": call_sid, **command})
        return await self.ownership.send(call_sid, message)

    def _call_message(self, message: bytes) -> None:
        """A command from `tell_call` (this or another instance) for a stream held here."""
        try:
            data = orjson.loads(message) if len(message) <= MAX_CALL_MESSAGE_BYTES else None
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            log.warning("ignored a malformed call command (%d bytes)", len(message))
            return
        call_sid, name = data.pop("call_sid", ""), data.pop("command", "")
        stream = self.calls.get(call_sid)
        if stream is None:
            log.info("call command %r for a stream no longer here", name[:40], extra={"call_sid": call_sid})
            return
        task = asyncio.create_task(stream.command(name, data), name=f"command-{call_sid}")
        self._commands.add(task)
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self._commands.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("call command %s failed", task.get_name(), exc_info=exc)

    def unregister(self, stream: LiveStream) -> None:
        if self.calls.get(stream.call_sid) is stream:
            del self.calls[stream.call_sid]
        self.metrics.active_calls.set(len(self.calls))

    @property
    def full(self) -> bool:
        """MAX_CALLS reached: `calls` counts live streams (one per call, duplicates are refused)."""
        return len(self.calls) >= self.settings.max_calls

    async def readiness(self) -> dict[str, object]:
        checks: dict[str, object] = {
            "draining": self.draining,
            "active_calls": len(self.calls),
            "max_calls": self.settings.max_calls,
            "store": self.store.kind,
        }
        store_ok = True
        if self.store.kind == "redis":
            try:
                store_ok = await asyncio.wait_for(self.store.ping(), timeout=1.0)
            except Exception:
                store_ok = False
        checks["store_ok"] = store_ok
        warning = self.insecure_warning()
        checks["insecure_dev"] = warning is not None
        if warning:
            checks["warning"] = warning
        checks["ready"] = store_ok and not self.draining and not self.full and self.started
        self.metrics.sync_store(self.store.queue_depth, self.store.dropped_writes)
        return checks

    # ---- transfer whisper: signed URL, so any instance can serve it -------------------------

    def _whisper_sig(self, text: str, expires: int) -> str:
        message = b"whisper:%d:" % expires + text.encode()
        mac = hmac.new(self.settings.stream_secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def whisper_url(self, text: str | None, *, memory: str | None = None, now: float | None = None) -> str | None:
        """A URL that serves ``text`` as <Say> for WHISPER_TTL_S seconds, capped and without caller memory."""
        text = whisper_text(text or "", memory=memory)
        if not text or not self.settings.public_url:
            return None
        expires = int(time.time() if now is None else now) + WHISPER_TTL_S
        query = urlencode({"text": text, "expires": str(expires), "sig": self._whisper_sig(text, expires)})
        return f"{self.settings.public_url}/transfer-whisper?{query}"

    def whisper_valid(self, text: str, expires: str, sig: str, *, now: float | None = None) -> bool:
        """A whisper URL this relay signed whose expiry has not passed (nor lies beyond any it mints)."""
        deadline = parse_expiry(expires)
        if deadline is None:
            return False  # one spelling per instant, as for stream tokens
        if not hmac.compare_digest(self._whisper_sig(text, deadline).encode(), sig.encode()):
            return False
        current = time.time() if now is None else now
        return current <= deadline <= current + WHISPER_TTL_S + WHISPER_CLOCK_SKEW_S

    # ---- graceful drain ----------------------------------------------------------------------

    async def drain(self) -> None:
        """SIGTERM: refuse new calls now. With RELAY_DRAIN_MODE=handoff and another instance ready, each
        call moves there at its next natural pause; otherwise (or for what is left) active calls may
        finish until DRAIN_SECONDS, then hear a goodbye."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = time.monotonic() + self.settings.drain_seconds
        log.info("draining: %d active calls, up to %.0f s", len(self.calls), self.settings.drain_seconds)
        if self.settings.drain_mode == "handoff" and self.calls:
            await self._hand_off_calls()
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        remaining = list(self.calls.values())
        if remaining:
            log.info("drain deadline reached; ending %d calls with a goodbye", len(remaining))
            await asyncio.gather(
                *(b.goodbye(DRAIN_GOODBYE, DRAIN_GOODBYE_TIMEOUT_S) for b in remaining), return_exceptions=True
            )
            teardown_deadline = time.monotonic() + DRAIN_TEARDOWN_WAIT_S
            while self.calls and time.monotonic() < teardown_deadline:
                await asyncio.sleep(0.05)
        log.info("drain complete", extra={"active_calls": len(self.calls)})

    async def _hand_off_calls(self) -> None:
        """Move every call to another instance (relay/transport/lifecycle.py: the stream closes at a
        natural pause and Twilio fetches the continuation from a ready instance)."""
        # Publish "draining" now rather than at the next beat, then give instances signalled at the
        # same moment (the workers of one host, a scaled-down deployment) time to do the same.
        await self.ownership.beat()
        await asyncio.sleep(HANDOFF_PEER_SETTLE_S)
        instances = await self.ownership.live_instances()
        ready = [i for i in instances or [] if i.instance != self.instance_id and i.state == "ready"]
        if not ready:
            log.warning(
                "no other instance is ready to take this instance's calls%s; they end with the drain's goodbye",
                "" if instances is not None else " (the store did not answer)",
            )
            return
        calls = list(self.calls.values())
        started = time.monotonic()
        log.info("handing %d calls off to the %d other ready instances", len(calls), len(ready))
        outcomes = await asyncio.gather(
            *(c.hand_off(self.settings.handoff_max_wait_s) for c in calls), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures[:3]:
            log.error("a call's hand-off failed", exc_info=failure)
        teardown_deadline = time.monotonic() + DRAIN_TEARDOWN_WAIT_S
        while self.calls and time.monotonic() < teardown_deadline:
            await asyncio.sleep(0.05)
        log.info(
            "hand-off complete in %.2f s: %d handed off, %d failed",
            time.monotonic() - started,
            sum(o is True for o in outcomes),
            len(failures),
        )

    def start_drain(self) -> asyncio.Task[None]:
        """Readiness turns false before this returns; the drain itself runs as a task."""
        if self._drain_task is None:
            self.draining = True
            self.metrics.draining.set(1)
            self._drain_task = asyncio.create_task(self.drain(), name="drain")
        return self._drain_task
