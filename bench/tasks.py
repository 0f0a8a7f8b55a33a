"""Let the bench count a relay process's asyncio tasks from outside.

``install()`` adds a SIGUSR1 handler that writes ``{"tasks": n, "by_name": {...}, "threads": n, "gc": ...}``
to ``$BENCH_TASKS_FILE``, and a ``gc.callbacks`` hook that times garbage-collector pauses (it runs per
collection, never per frame), so the relay under test is otherwise unchanged.
``python -m bench.tasks serve`` runs ``python -m relay serve`` with the handler installed.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import re
import signal
import sys
import threading
import time
from types import FrameType

ENV = "BENCH_TASKS_FILE"
_DIGITS = re.compile(r"[-_]?(CA[0-9a-f]{32}|MZ[0-9a-f]{32}|\d+)$")


_gc_started = 0.0
_gc_stats: dict[int, list[float]] = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}


def _gc_callback(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
        return
    pause = time.perf_counter() - _gc_started
    stats = _gc_stats[info.get("generation", 2)]
    stats[0] += 1
    stats[1] += pause
    stats[2] = max(stats[2], pause)


_lag_ms: list[float] = []


async def _lag_monitor() -> None:
    """Diagnostics only (BENCH_LOOP_LAG=1): how late a 2 ms timer fires = how long the loop was busy."""
    while True:
        t0 = time.perf_counter()
        await asyncio.sleep(0.002)
        late = (time.perf_counter() - t0) * 1000 - 2.0
        if late > 1.0:
            _lag_ms.append(late)


def snapshot() -> dict[str, object]:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    names: collections.Counter[str] = collections.Counter()
    count = 0
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            count += 1
            names[_DIGITS.sub("", task.get_name())] += 1
        if os.environ.get("BENCH_LOOP_LAG") and not any(t.get_name() == "bench-lag" for t in asyncio.all_tasks(loop)):
            loop.create_task(_lag_monitor(), name="bench-lag")
    gc_pauses = {
        f"gen{gen}": {"count": int(v[0]), "total_ms": round(v[1] * 1000, 1), "max_ms": round(v[2] * 1000, 2)}
        for gen, v in _gc_stats.items()
    }
    return {
        "tasks": count,
        "by_name": dict(names),
        "threads": threading.active_count(),
        "loop": loop is not None,
        "gc": gc_pauses,
        "loop_lag_ms": sorted(_lag_ms)[-20:],
        "loop_lag_over_10ms": sum(1 for v in _lag_ms if v > 10),
    }


def _handler(signum: int, frame: FrameType | None) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(snapshot(), fh)
    os.replace(tmp, path)


def quiet_gc() -> None:
    """For the bench's own processes (never the relay under test): no collector pauses in the figures.

    The simulator and the generator keep every session's events; a full collection over them stalls
    every call at once for tens of ms. Freeze what exists, collect the young generation rarely."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000_000)


def install() -> None:
    signal.signal(signal.SIGUSR1, _handler)
    gc.callbacks.append(_gc_callback)


def main() -> int:
    install()
    from relay.__main__ import main as relay_main

    return relay_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
