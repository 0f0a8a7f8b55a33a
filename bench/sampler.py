"""Twice-a-second samples of the bench's processes and of the machine, and which intervals were noisy.

A point's CPU figures are differences between two samples; its "quiet" latency figures leave out
the half-seconds in which processes outside the bench were busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.procs import Proc, Sample, cpu_seconds, machine_busy

NOISE_CORES = 0.25
"""Half-second intervals in which other processes (not the bench's) used more CPU are "noisy"."""


def redis_pids(url: str) -> tuple[int, ...]:
    """The redis-server serving the project (its CPU is the relay's cost, not noise)."""
    port = str(urlsplit(url).port or 6379)
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "redis-server" in cmdline and port in cmdline:
                    found.append(int(entry.name))
    return tuple(found)


class Sampler:
    """Samples the relay, the simulator, the generator and the machine twice a second."""

    def __init__(self, procs: dict[str, Proc], extra_pids: tuple[int, ...] = ()) -> None:
        self.procs = procs
        self.extra_pids = extra_pids
        self.series: dict[str, list[Sample]] = {name: [] for name in procs}
        self.machine: list[tuple[float, float, float]] = []
        self.ours: list[tuple[float, float, float, float]] = []
        """(t, machine busy jiffies, machine total jiffies, CPU seconds of the bench's processes)."""
        self._task: asyncio.Task[None] | None = None

    def take(self) -> dict[str, Sample]:
        now: dict[str, Sample] = {}
        ours = 0.0
        for name, proc in self.procs.items():
            if proc.alive():
                with contextlib.suppress(OSError, ValueError):
                    sample = proc.sample()
                    self.series[name].append(sample)
                    now[name] = sample
                    ours += sample.cpu_s
        for pid in self.extra_pids:
            with contextlib.suppress(OSError, ValueError):
                ours += cpu_seconds(pid)
        busy, total = machine_busy()
        t = time.monotonic()
        self.machine.append((t, busy, total))
        self.ours.append((t, busy, total, ours))
        return now

    def noisy_intervals(self, threshold_cores: float) -> list[tuple[float, float]]:
        """Intervals in which processes outside the bench used more than threshold_cores."""
        cores = os.cpu_count() or 1
        noisy: list[tuple[float, float]] = []
        for (t0, b0, j0, o0), (t1, b1, j1, o1) in zip(self.ours, self.ours[1:], strict=False):
            if t1 <= t0 or j1 <= j0:
                continue
            other = (b1 - b0) / (j1 - j0) * cores - max(0.0, o1 - o0) / (t1 - t0)
            if other > threshold_cores:
                noisy.append((t0, t1))
        return noisy

    async def _loop(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(0.5)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._loop())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
