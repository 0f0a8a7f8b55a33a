"""Prometheus metrics. Nothing here runs per audio frame except sampled hop latency.

One process: every metric lives in the ``Metrics`` object's own registry and ``render()``
exposes it. Several worker processes (``--workers`` / ``WEB_CONCURRENCY``) sharing one
port: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty writable directory and every worker
writes its values to memory-mapped files there; whichever worker answers ``/metrics``
then reports the sum over all of them (prometheus-client's multiprocess mode). Without
that variable each scrape sees only the worker that happened to answer it.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from relay.env import ConfigError

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
M2E_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TOOL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CALL_DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
HOP_SAMPLE_EVERY = 25  # one frame in 25 (every half second of caller audio) is timed, starting with the first
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_LABEL_VALUES = 50  # per label of free-form origin (error codes, tool names, end reasons)
OTHER = "other"
_MONOTONIC_AT_IMPORT = time.monotonic()  # close enough to the process start for an uptime panel

# Token kinds as flattened from response.done usage (relay.realtime.dialect.flatten_usage).
TOKEN_DETAIL_KINDS = ("input_text", "input_audio", "input_image", "input_cached", "output_text", "output_audio")
_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_.:\-]")


def package_version() -> str:
    """The installed distribution's version; the source tree's when it runs uninstalled."""
    try:
        return metadata.version("phone-relay")
    except metadata.PackageNotFoundError:
        from relay import __version__

        return __version__


def _resident_bytes() -> int | None:
    """Resident set size now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def reset_multiprocess_dir(path: str | None = None) -> None:
    """Start of a server: remove metric files a previous run left behind (they would add up).

    Raises ConfigError (one line naming the variable) when the directory cannot be made, is not a
    directory, or is not writable: every worker would otherwise fail on its first metric.
    """
    path = path or multiprocess_dir()
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{MULTIPROC_ENV}={path!r} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{MULTIPROC_ENV}={path!r} cannot be created: {exc.strerror or exc}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
        for name in glob.glob(os.path.join(path, "*.db")):
            os.remove(name)
    except OSError as exc:
        raise ConfigError(f"{MULTIPROC_ENV}={path!r} is not writable: {exc.strerror or exc}") from None


def mark_worker_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (active calls, queue depth); its counters stay."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _LabelGuard:
    """Caps the distinct values of a free-form label so a misbehaving peer cannot explode cardinality."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        value = _LABEL_SAFE.sub("_", value or "unknown")[:64] or "unknown"
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


def usage_cost(usage: Mapping[str, int], prices: Mapping[str, float]) -> float:
    """USD for one response.done usage, from per-1000-token prices by kind.

    Cached input tokens are billed at the ``cached`` price instead of their normal input
    price: they are taken off text input first, then off audio input (when ``cached`` has
    no price they cost the normal input price).
    """
    if not prices:
        return 0.0
    text = max(0, usage.get("input_text", 0))
    audio = max(0, usage.get("input_audio", 0))
    cached = max(0, usage.get("input_cached", 0)) if "cached" in prices else 0
    cached_text = min(cached, text)
    cached_audio = min(cached - cached_text, audio)
    billed = {
        "input_text": text - cached_text,
        "input_audio": audio - cached_audio,
        "cached": cached_text + cached_audio,
        "output_text": max(0, usage.get("output_text", 0)),
        "output_audio": max(0, usage.get("output_audio", 0)),
    }
    return sum(count / 1000.0 * float(prices[kind]) for kind, count in billed.items() if kind in prices)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # prometheus-client picks its value storage when it is first imported, from the environment.
        self.multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False)) and multiprocess_dir() is not None
        r = self.registry
        self.active_calls = Gauge(
            "relay_active_calls", "Calls currently relayed by this instance", registry=r, multiprocess_mode="livesum"
        )
        self.calls_started = Counter("relay_calls_started_total", "Calls admitted (stream accepted)", registry=r)
        self.calls_ended = Counter("relay_calls_ended_total", "Calls ended, by reason", ["reason"], registry=r)
        self.calls_refused = Counter("relay_calls_refused_total", "Webhooks or streams refused", ["reason"], registry=r)
        self.continuations = Counter(
            "relay_continuations_total",
            "Continuation webhooks answered (a stream ended without its call), by answer",
            ["answer"],
            registry=r,
        )
        self.outbound_calls = Counter(
            "relay_outbound_calls_total",
            "POST /calls requests by outcome: placed, cap or rate (429), failed (Twilio refused or unreachable)",
            ["outcome"],
            registry=r,
        )
        self.hop_latency = Histogram(
            "relay_hop_latency_seconds",
            "Time from receiving a frame to handing it to the other socket (sampled)",
            ["direction"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mouth_to_ear = Histogram(
            "relay_mouth_to_ear_seconds",
            "Caller stops speaking -> first assistant audio sent to Twilio (sent) or acknowledged as played",
            ["stage"],
            buckets=M2E_BUCKETS,
            registry=r,
        )
        self.barge_ins = Counter("relay_barge_ins_total", "Caller interruptions of assistant audio", registry=r)
        self.truncations = Counter("relay_truncations_total", "conversation.item.truncate sent", registry=r)
        self.realtime_errors = Counter("relay_realtime_errors_total", "Realtime API error events", ["code"], registry=r)
        self.upstream_reconnects = Counter(
            "relay_upstream_reconnects_total", "New Realtime sessions opened mid-call", ["reason"], registry=r
        )
        self.tool_calls = Counter(
            "relay_tool_calls_total", "Tool calls by name and outcome", ["name", "outcome"], registry=r
        )
        self.tool_duration = Histogram(
            "relay_tool_duration_seconds", "Tool handler duration", ["name"], buckets=TOOL_BUCKETS, registry=r
        )
        self.tokens = Counter("relay_tokens_total", "Tokens reported by response.done, by kind", ["kind"], registry=r)
        self.cost = Counter(
            "relay_cost_usd_total", "Estimated Realtime API cost from configured token prices", registry=r
        )
        self.call_cost = Histogram(
            "relay_call_cost_usd",
            "Estimated cost per call from configured token prices",
            buckets=COST_BUCKETS,
            registry=r,
        )
        self.responses = Counter("relay_responses_total", "Realtime responses by status", ["status"], registry=r)
        self.store_queue_depth = Gauge(
            "relay_store_queue_depth", "State writes waiting for Redis", registry=r, multiprocess_mode="livesum"
        )
        self.caller_audio_dropped = Counter(
            "relay_caller_audio_dropped_frames_total",
            "Caller audio frames dropped because no Realtime session took them within the hold window",
            registry=r,
        )
        self.store_dropped = Counter(
            "relay_store_dropped_writes_total", "State writes dropped (queue overflow, Redis refusal)", registry=r
        )
        self.draining = Gauge(
            "relay_draining", "1 while the instance drains after SIGTERM", registry=r, multiprocess_mode="livemax"
        )
        self.context_trims = Counter(
            "relay_context_trims_total", "Conversation trims after an out-of-band summary", registry=r
        )
        self.call_duration = Histogram(
            "relay_call_duration_seconds",
            "Duration of relayed calls, observed when each ends",
            buckets=CALL_DURATION_BUCKETS,
            registry=r,
        )
        # The process's own resources. prometheus-client's ProcessCollector reads only the process that
        # answers a scrape and is not available in multiprocess mode, so each process writes its own
        # values (sync_store, every second and at each scrape); with several workers a scrape shows one
        # series per live worker (label pid), without them one series.
        self.process_cpu = Gauge(
            "relay_process_cpu_seconds",
            "CPU time (user + system) this process has used since it started",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_memory = Gauge(
            "relay_process_resident_memory_bytes",
            "Resident memory of this process",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_open_fds = Gauge(
            "relay_process_open_fds", "Open file descriptors of this process", registry=r, multiprocess_mode="liveall"
        )
        self.process_start_time = Gauge(
            "relay_process_start_time_seconds",
            "When this process started, seconds since the epoch",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.process_start_time.set(time.time() - time.monotonic() + _MONOTONIC_AT_IMPORT)
        self.webhooks_delivered = Counter(
            "relay_webhooks_delivered_total", "Webhook events delivered (a 2xx answer), by type", ["type"], registry=r
        )
        self.webhook_retries = Counter(
            "relay_webhook_retries_total",
            "Failed webhook delivery attempts to be retried, by failure (timeout, connect_error, status_503, ...)",
            ["reason"],
            registry=r,
        )
        self.webhooks_abandoned = Counter(
            "relay_webhooks_abandoned_total",
            "Webhook events given up: refused with a status that is not retried (status_400, ...) or expired",
            ["reason"],
            registry=r,
        )
        self.webhook_queue_depth = Gauge(
            "relay_webhook_queue_depth",
            "Webhook events queued (due, waiting for a retry, or being delivered); shared by every instance on Redis",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "relay_build_info",
            "Always 1; the labels say what is running",
            ["version", "python", "dialect", "model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._dropped_seen = 0
        self._codes = _LabelGuard()
        self._tool_names = _LabelGuard()
        self._reasons = _LabelGuard()
        self._statuses = _LabelGuard(20)
        self._models = _LabelGuard(5)
        self._webhook_reasons = _LabelGuard(20)
        # In multiprocess mode a gauge's series exists from its creation, at 0: fill in the real values
        # at once, so a scrape before the first periodic sync never shows a worker with no CPU time.
        self.sample_process()

    # ---- recording -------------------------------------------------------------------------

    def observe(self, name: str, value: float, label: str) -> None:
        """Dispatch for the call object's Metric effects."""
        if name == "barge_ins":
            self.barge_ins.inc()
        elif name == "truncations":
            self.truncations.inc()
        elif name == "realtime_errors":
            self.realtime_errors.labels(self._codes(label)).inc()
        elif name == "mouth_to_ear_sent_seconds":
            self.mouth_to_ear.labels("sent").observe(value)
        elif name == "mouth_to_ear_played_seconds":
            self.mouth_to_ear.labels("played").observe(value)
        elif name == "responses":
            self.responses.labels(self._statuses(label)).inc()
        elif name == "context_trims":
            self.context_trims.inc()

    def call_ended(self, reason: str, duration_s: float | None = None) -> None:
        self.calls_ended.labels(self._reasons(reason)).inc()
        if duration_s is not None:
            self.call_duration.observe(max(0.0, duration_s))

    def webhook_delivered(self, event_type: str) -> None:
        self.webhooks_delivered.labels(self._webhook_reasons(event_type)).inc()

    def webhook_retried(self, reason: str) -> None:
        self.webhook_retries.labels(self._webhook_reasons(reason)).inc()

    def webhook_abandoned(self, reason: str) -> None:
        self.webhooks_abandoned.labels(self._webhook_reasons(reason)).inc()

    def set_build_info(self, dialect: str, model: str) -> None:
        """What this process runs: package version, Python version, Realtime dialect and default model."""
        self.build_info.labels(package_version(), platform.python_version(), dialect, self._models(model)).set(1)

    def sample_process(self) -> None:
        """Copy this process's CPU time, resident memory and open descriptors into its gauges."""
        self.process_cpu.set(time.process_time())
        rss = _resident_bytes()
        if rss is not None:
            self.process_memory.set(rss)
        fds = _open_fds()
        if fds is not None:
            self.process_open_fds.set(fds)

    def tool_call(self, name: str, outcome: str, duration_s: float) -> None:
        label = self._tool_names(name) if outcome != "unknown_tool" else "unknown"
        self.tool_calls.labels(label, outcome).inc()
        self.tool_duration.labels(label).observe(duration_s)

    def record_usage(self, usage: Mapping[str, int], prices: Mapping[str, float]) -> float:
        """Count tokens by kind from one response.done; return (and count) its estimated cost."""
        has_details = {side: any(k.startswith(f"{side}_") for k in usage) for side in ("input", "output")}
        for kind, count in usage.items():
            if count <= 0:
                continue
            if kind in TOKEN_DETAIL_KINDS or (kind in ("input", "output") and not has_details[kind]):
                self.tokens.labels(kind).inc(count)
        cost = usage_cost(usage, prices)
        if cost > 0:
            self.cost.inc(cost)
        return cost

    def sync_store(self, queue_depth: int, dropped_writes: int) -> None:
        """Copy the store's own counters, and sample the process (at scrape time and every second in
        the background, never on the audio path)."""
        self.sample_process()
        self.store_queue_depth.set(queue_depth)
        if dropped_writes > self._dropped_seen:
            self.store_dropped.inc(dropped_writes - self._dropped_seen)
        self._dropped_seen = max(self._dropped_seen, dropped_writes)

    # ---- exposition ------------------------------------------------------------------------

    def render(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
