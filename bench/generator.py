"""Load generator: N simulated Twilio calls in one process (``python -m bench.generator``).

What each call does and measures is in ``bench.call``; with ``--mode direct`` each call is a
Realtime session straight to the simulator (no relay): the baseline.

One scheduler task paces all calls (a heap of due times, each call on its own 20 ms phase, so
frames are spread over the period as real calls are); replies are handled in protocol callbacks.
Progress goes to stdout as JSON lines (``ramp``, ``steady``, ``hangup``, ``done``) for the runner.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal

from bench import tasks
from bench.call import Call
from relay.sim import ulaw

FRAME_S = 0.020
QUIET_BEFORE_HANGUP_S = 4.0

Mode = Literal["twilio", "direct"]


@dataclass
class LoadConfig:
    mode: Mode
    target: str
    """twilio: the relay's base URL (webhook); direct: the simulator's Realtime URL."""
    calls: int
    hold_s: float
    ramp_s: float
    auth_token: str = ""
    public_url: str | None = None
    barge_in: float = 0.35
    seed: int = 7
    settle_s: float = 2.0
    index_base: int = 0


@dataclass
class Stats:
    """Everything one process measured; latency pairs are (stamp_us, arrival_us)."""

    down_pairs: array[int] = field(default_factory=lambda: array("q"))
    mark_pairs: array[int] = field(default_factory=lambda: array("q"))
    tick_late_us: array[int] = field(default_factory=lambda: array("q"))
    events: list[dict[str, Any]] = field(default_factory=list)


class Generator:
    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.calls = [Call(self, i) for i in range(cfg.calls)]
        self.speech = [ulaw.synth_speech(ms, seed=s) for s, ms in ((1, 900), (2, 1200), (3, 1500))]
        self.quiet_after = float("inf")
        self._heap: list[tuple[float, int]] = []
        self._stop = False

    def emit(self, event: str, **fields: Any) -> None:
        entry = {"event": event, "t": time.monotonic(), **fields}
        self.stats.events.append(entry)
        sys.stdout.write(json.dumps(entry) + "\n")
        sys.stdout.flush()

    async def _start_call(self, call: Call, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        try:
            await call.open()
        except Exception as exc:
            call.error = f"setup failed: {type(exc).__name__}: {exc}"[:300]
            call.closed = True
            return
        heapq.heappush(self._heap, (time.monotonic() + FRAME_S, call.index))

    async def _schedule(self) -> None:
        """Tick every call on its own 20 ms grid; a tick due within 0.5 ms is taken now."""
        heap, calls = self._heap, self.calls
        late = self.stats.tick_late_us
        while not self._stop:
            now = time.monotonic()
            budget = now + 0.0005
            while heap and heap[0][0] <= budget:
                due, index = heapq.heappop(heap)
                call = calls[index]
                if call.closed or call.hanging_up:
                    continue
                if now - due > 0.0005:
                    late.append(int((now - due) * 1_000_000))
                call.tick(now)
                # A call that fell far behind skips ticks instead of bursting (as a phone line would).
                next_due = due + FRAME_S
                if next_due < now - 3 * FRAME_S:
                    next_due = now + FRAME_S
                heapq.heappush(heap, (next_due, index))
                now = time.monotonic()
            delay = heap[0][0] - time.monotonic() if heap else 0.005
            await asyncio.sleep(max(0.001, delay))

    async def run(self) -> None:
        cfg = self.cfg
        scheduler = asyncio.create_task(self._schedule())
        t0 = time.monotonic()
        spacing = cfg.ramp_s / max(1, cfg.calls)
        self.emit("ramp", calls=cfg.calls)
        starts = [asyncio.create_task(self._start_call(c, t0 + i * spacing)) for i, c in enumerate(self.calls)]
        await asyncio.gather(*starts)
        failed = sum(1 for c in self.calls if c.closed)
        await asyncio.sleep(cfg.settle_s)
        steady = time.monotonic()
        hangup_at = steady + cfg.hold_s
        self.quiet_after = hangup_at - QUIET_BEFORE_HANGUP_S
        self.emit("steady", setup_failed=failed)
        await asyncio.sleep(max(0.0, hangup_at - time.monotonic()))
        self.emit("hangup")
        spread = min(1.0, cfg.ramp_s)
        for i, call in enumerate(self.calls):
            call.hangup()
            if spread and i % 10 == 9:
                await asyncio.sleep(spread * 10 / max(1, cfg.calls))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(c.closed or c.ws is None for c in self.calls):
            await asyncio.sleep(0.05)
        self._stop = True
        await scheduler
        for call in self.calls:
            if not call.closed and call.ws is not None:
                call.ws.abort()
                call.error = call.error or "no close handshake within 10 s of hanging up"

    def write(self, prefix: str) -> None:
        stats = self.stats
        with open(prefix + ".down.bin", "wb") as fh:
            stats.down_pairs.tofile(fh)
        with open(prefix + ".marks.bin", "wb") as fh:
            stats.mark_pairs.tofile(fh)
        late = sorted(stats.tick_late_us)
        summary = {
            "mode": self.cfg.mode,
            "calls": [c.summary() for c in self.calls],
            "events": stats.events,
            "tick_late": {
                "count": len(late),
                "p99_ms": late[int(len(late) * 0.99)] / 1000 if late else 0.0,
                "max_ms": late[-1] / 1000 if late else 0.0,
            },
            "ticks": sum(c.frames_sent for c in self.calls),
            "gc": tasks.snapshot()["gc"],
        }
        with open(prefix + ".json", "w") as fh:
            json.dump(summary, fh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generator", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("twilio", "direct"), default="twilio")
    parser.add_argument("--target", required=True, help="relay base URL, or the simulator's ws URL (direct)")
    parser.add_argument("--public-url", default=None)
    parser.add_argument("--auth-token", default="")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--hold", type=float, default=20.0, help="seconds with every call active")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which calls start")
    parser.add_argument("--barge-in", type=float, default=0.35, help="share of answers interrupted")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last call is up")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--index-base", type=int, default=0, help="first call number in the markers")
    parser.add_argument("--out", required=True, help="path prefix for the result files")
    args = parser.parse_args(argv)
    cfg = LoadConfig(
        mode=args.mode,
        target=args.target,
        calls=args.calls,
        hold_s=args.hold,
        ramp_s=args.ramp,
        auth_token=args.auth_token,
        public_url=args.public_url,
        barge_in=args.barge_in,
        seed=args.seed,
        settle_s=args.settle,
        index_base=args.index_base,
    )
    import uvloop

    gen = Generator(cfg)
    tasks.install()
    tasks.quiet_gc()
    uvloop.run(gen.run())
    gen.write(args.out)
    gen.emit("done", out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
