"""What one bench run is asked to do: shared by the sweep, the soak and every point they measure."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

RELAYS = ("floor", "project")


@dataclass
class Options:
    calls: list[int]
    seconds: float = 30.0
    relays: tuple[str, ...] = RELAYS
    baseline: bool = True
    out: Path = Path("bench/out")
    redis_url: str = "redis://127.0.0.1:6379/14"
    reply_ms: int = 3000
    realtime_factor: float = 4.0
    barge_in: float = 0.35
    settle_s: float = 1.0
    """Seconds after every call is up before the CPU and latency window opens."""
    gen_settle_s: float = 2.0
    profile: str | None = None
    """py-spy: record the relay (project) during the window of every point into the out folder."""
    caller_memory: bool = True
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    auth_token: str = field(default_factory=lambda: secrets.token_hex(16))
    stream_secret: str = field(default_factory=lambda: secrets.token_hex(24))
    api_token: str = field(default_factory=lambda: secrets.token_hex(16))
    pin: str = "priority"
    """How the relay gets its CPU: "priority", "cpu" or "none" (see bench.relay_under_test.pin)."""
    variants: dict[str, str] = field(default_factory=dict)
    """Extra relay kinds: name -> a source tree of this project, run like "project" (A/B of changes)."""
