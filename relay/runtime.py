"""Everything one relay process shares between its calls, created at start-up."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from relay.config import AgentSettings, Settings
from relay.metrics import Metrics
from relay.profiles import Profiles, load_profiles
from relay.realtime.dialect import Dialect, get_dialect
from relay.store import Store, make_store
from relay.tools import ToolRegistry
from relay.twilio.rest import TwilioControl

if TYPE_CHECKING:
    from relay.bridge import CallBridge

log = logging.getLogger("relay.runtime")
DRAIN_GOODBYE = "Sorry, we have to end this call for maintenance. Please call back. Goodbye."
# After DRAIN_SECONDS: goodbye (generated and played) + teardown + uvicorn shutdown + store flush
# stay under the 10 s margin the deployment gives (terminationGracePeriodSeconds, infra/DEPLOY.md).
DRAIN_GOODBYE_TIMEOUT_S = 4.5
DRAIN_TEARDOWN_WAIT_S = 1.0  # each call's teardown (final summary, state writes)
METRICS_SYNC_S = 1.0
MAX_WHISPER_CHARS = 600


def check_configuration(
    settings: Settings, *, tools: ToolRegistry | None = None, profiles: Profiles | None = None
) -> tuple[ToolRegistry, Profiles]:
    """Load tool modules and agent profiles and check they fit together; raises ConfigError."""
    if tools is None:
        tools = ToolRegistry(settings.tool_timeout_s)
        tools.load_modules(settings.handler_modules)
    profiles = profiles or load_profiles(settings.profiles_file, settings.agent)
    profiles.check_tools(tools.tools)
    profiles.check_dialect(settings.dialect)
    return tools, profiles


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
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or Metrics()
        self.store: Store = store or make_store(
            settings.redis_url,
            prefix=settings.redis_prefix,
            state_ttl_s=settings.state_ttl_s,
            caller_memory_ttl_s=settings.caller_memory_ttl_s,
            queue_size=settings.store_queue_size,
            caller_key_secret=settings.caller_key,
        )
        self.tools, self.profiles = check_configuration(settings, tools=tools, profiles=profiles)
        if twilio_control is None and settings.twilio_account_sid and settings.twilio_auth_token:
            twilio_control = TwilioControl(
                settings.twilio_account_sid, settings.twilio_auth_token, api_base=settings.twilio_api_base
            )
        self.twilio_control = twilio_control
        self.calls: dict[str, CallBridge] = {}
        self.draining = False
        self.started = False
        self._drain_task: asyncio.Task[None] | None = None
        self._metrics_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.start()
        self.started = True
        self._metrics_task = asyncio.create_task(self._sync_metrics(), name="metrics-sync")

    async def stop(self) -> None:
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            self._metrics_task = None
        await self.store.close()
        self.metrics.sync_store(self.store.queue_depth, self.store.dropped_writes)
        self.started = False

    async def _sync_metrics(self) -> None:
        """Store gauges are copied periodically: with several workers any one of them answers a scrape."""
        while True:
            self.metrics.sync_store(self.store.queue_depth, self.store.dropped_writes)
            await asyncio.sleep(METRICS_SYNC_S)

    def profile_for(self, called: str) -> AgentSettings:
        return self.profiles.for_number(called) if called else self.profiles.default

    def register(self, bridge: CallBridge) -> bool:
        """Count the bridge's stream as live here; False (nothing changed) if another stream of its
        call already is. `calls` is keyed by call SID, so it holds one stream per call."""
        current = self.calls.get(bridge.call_sid)
        if current is not None and current is not bridge:
            return False
        self.calls[bridge.call_sid] = bridge
        self.metrics.active_calls.set(len(self.calls))
        return True

    def unregister(self, bridge: CallBridge) -> None:
        if self.calls.get(bridge.call_sid) is bridge:
            del self.calls[bridge.call_sid]
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
        checks["ready"] = store_ok and not self.draining and not self.full and self.started
        self.metrics.sync_store(self.store.queue_depth, self.store.dropped_writes)
        return checks

    # ---- transfer whisper: signed URL, so any instance can serve it -------------------------

    def _whisper_sig(self, text: str) -> str:
        mac = hmac.new(self.settings.stream_secret, b"whisper:" + text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def whisper_url(self, text: str | None) -> str | None:
        if not text or not self.settings.public_url:
            return None
        text = text[:MAX_WHISPER_CHARS]
        query = urlencode({"text": text, "sig": self._whisper_sig(text)})
        return f"{self.settings.public_url}/transfer-whisper?{query}"

    def whisper_valid(self, text: str, sig: str) -> bool:
        return hmac.compare_digest(self._whisper_sig(text), sig)

    # ---- graceful drain ----------------------------------------------------------------------

    async def drain(self) -> None:
        """SIGTERM: refuse new calls now; let active calls finish until DRAIN_SECONDS, then say goodbye."""
        self.draining = True
        self.metrics.draining.set(1)
        deadline = time.monotonic() + self.settings.drain_seconds
        log.info("draining: %d active calls, up to %.0f s", len(self.calls), self.settings.drain_seconds)
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

    def start_drain(self) -> asyncio.Task[None]:
        """Readiness turns false before this returns; the drain itself runs as a task."""
        if self._drain_task is None:
            self.draining = True
            self.metrics.draining.set(1)
            self._drain_task = asyncio.create_task(self.drain(), name="drain")
        return self._drain_task
