"""Turning what the generator and the simulator recorded into figures."""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_WRAP = 1 << 48


def load_pairs(path: Path) -> array[int]:
    pairs: array[int] = array("q")
    if path.exists():
        with open(path, "rb") as fh:
            pairs.frombytes(fh.read())
    return pairs


def window_ms(
    pairs: array[int], start_s: float, end_s: float, exclude: Sequence[tuple[float, float]] = ()
) -> list[float]:
    """Latencies (ms) of the (stamp µs, arrival µs) pairs whose stamp falls in [start_s, end_s),
    leaving out stamps inside any of the ``exclude`` intervals (seconds)."""
    lo = int(start_s * 1_000_000) % _WRAP
    hi = int(end_s * 1_000_000) % _WRAP
    cuts = sorted((int(a * 1_000_000) % _WRAP, int(b * 1_000_000) % _WRAP) for a, b in exclude)
    starts = [a for a, _ in cuts]
    out: list[float] = []
    append = out.append
    for i in range(0, len(pairs) - 1, 2):
        stamp = pairs[i]
        if lo <= stamp < hi:
            if cuts:
                j = bisect.bisect_right(starts, stamp) - 1
                if j >= 0 and stamp < cuts[j][1]:
                    continue
            append(((pairs[i + 1] - stamp) % _WRAP) / 1000.0)
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[index]


def summarize(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
    }


def barge_in_reactions(calls: list[dict[str, Any]], sessions: list[dict[str, Any]]) -> list[float]:
    """ms from the simulator's speech_started to the caller receiving `clear`, per clear."""
    started: dict[int, list[float]] = {}
    for session in sessions:
        if session["call"] is not None:
            started.setdefault(int(session["call"]), []).extend(session["speech_started"])
    for times in started.values():
        times.sort()
    out: list[float] = []
    for call in calls:
        times = started.get(call["index"], [])
        for clear_at in call["clears"]:
            i = bisect.bisect_right(times, clear_at) - 1
            if i >= 0 and clear_at - times[i] < 2.0:
                out.append((clear_at - times[i]) * 1000.0)
    return out


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    if den == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / den


def added(raw: float | None, baseline: float | None) -> float | None:
    """A figure through the relay minus the same figure on the direct path (never below zero)."""
    if raw is None or baseline is None:
        return raw
    return round(max(0.0, raw - baseline), 3)
