"""Prometheus metrics. Nothing here runs per audio frame except sampled hop latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
M2E_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
HOP_SAMPLE_EVERY = 25  # one frame in 25 (every half second of caller audio) is timed


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_calls = Gauge("relay_active_calls", "Calls currently relayed by this instance", registry=r)
        self.calls_ended = Counter("relay_calls_ended_total", "Calls ended, by reason", ["reason"], registry=r)
        self.calls_refused = Counter("relay_calls_refused_total", "Webhooks or streams refused", ["reason"], registry=r)
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
        self.tool_duration = Histogram("relay_tool_duration_seconds", "Tool handler duration", ["name"], registry=r)
        self.tokens = Counter("relay_tokens_total", "Tokens reported by response.done", ["kind"], registry=r)
        self.call_cost = Histogram(
            "relay_call_cost_usd",
            "Estimated cost per call from configured token prices",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.responses = Counter("relay_responses_total", "Realtime responses by status", ["status"], registry=r)
        self.store_queue_depth = Gauge("relay_store_queue_depth", "State writes waiting for Redis", registry=r)
        self.store_dropped = Gauge(
            "relay_store_dropped_writes", "State writes dropped since start (Redis unavailable)", registry=r
        )
        self.draining = Gauge("relay_draining", "1 while the instance drains after SIGTERM", registry=r)
        self.context_trims = Counter(
            "relay_context_trims_total", "Conversation trims after an out-of-band summary", registry=r
        )

    def observe(self, name: str, value: float, label: str) -> None:
        """Dispatch for the call object's Metric effects."""
        if name == "barge_ins":
            self.barge_ins.inc()
        elif name == "truncations":
            self.truncations.inc()
        elif name == "realtime_errors":
            self.realtime_errors.labels(label or "unknown").inc()
        elif name == "mouth_to_ear_sent_seconds":
            self.mouth_to_ear.labels("sent").observe(value)
        elif name == "mouth_to_ear_played_seconds":
            self.mouth_to_ear.labels("played").observe(value)
        elif name == "responses":
            self.responses.labels(label or "unknown").inc()
        elif name == "context_trims":
            self.context_trims.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
