"""A call's timeline as the console draws it (an SVG the page renders itself): who spoke when,
barge-ins with what the caller had heard, tool runs, and each answer's mouth-to-ear latency.

Entries carry the time they were recorded: a transcript line when the utterance was transcribed,
so a turn is drawn ending there, as long as its words take at a speaking pace (at most back to
the entry before it).
"""

from __future__ import annotations

from typing import Any

WIDTH = 760.0  # drawing units across the time axis (the SVG scales to the page)
LEFT = 90.0  # room for the row labels
SECONDS_PER_WORD = 0.35
ROWS = {"caller": 14.0, "assistant": 44.0, "tool": 74.0}
ROW_HEIGHT = 20.0
HEIGHT = 128.0


def _words(text: str) -> int:
    return max(1, len(text.split()))


def timeline(entries: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    span = max(1.0, t1 - t0)

    def x(t: float) -> float:
        return round(LEFT + WIDTH * min(1.0, max(0.0, (t - t0) / span)), 1)

    shapes: list[dict[str, Any]] = []
    previous = t0
    tools: dict[str, tuple[float, str]] = {}
    for entry in entries:
        try:
            t = float(entry.get("t") or t0)
        except (TypeError, ValueError):
            continue
        kind = entry.get("kind")
        if kind in ("caller", "assistant"):
            text = str(entry.get("text", ""))
            begin = max(previous, t - _words(text) * SECONDS_PER_WORD)
            start = x(begin)
            shapes.append(
                {
                    "kind": kind,
                    "x": start,
                    "y": ROWS[kind],
                    "w": max(2.0, x(t) - start),
                    "h": ROW_HEIGHT,
                    "label": f"{'Caller' if kind == 'caller' else 'Assistant'} at {t - t0:.1f} s: {text[:120]}",
                }
            )
        elif kind == "interruption":
            heard, sent = entry.get("audio_end_ms", 0), entry.get("received_ms", 0)
            shapes.append(
                {
                    "kind": "barge_in",
                    "x": x(t),
                    "y": ROWS["caller"] - 4,
                    "w": 3.0,
                    "h": ROWS["assistant"] + ROW_HEIGHT - ROWS["caller"] + 8,
                    "label": f"Barge-in at {t - t0:.1f} s: heard {heard} ms of {sent} ms",
                }
            )
        elif kind == "tool_call":
            tools[str(entry.get("call_id", ""))] = (t, str(entry.get("name", "")))
        elif kind == "tool_result":
            began, name = tools.pop(str(entry.get("call_id", "")), (t, "tool"))
            start = x(began)
            shapes.append(
                {
                    "kind": "tool",
                    "x": start,
                    "y": ROWS["tool"],
                    "w": max(3.0, x(t) - start),
                    "h": ROW_HEIGHT,
                    "label": f"Tool {name} ran {t - began:.2f} s ({'ok' if entry.get('ok') else 'failed'})",
                }
            )
        elif kind == "latency":
            ms = entry.get("mouth_to_ear_ms", 0)
            shapes.append(
                {
                    "kind": "latency",
                    "x": x(t),
                    "y": ROWS["tool"] + ROW_HEIGHT + 18,
                    "w": 0.0,
                    "h": 0.0,
                    "label": f"{ms} ms",
                }
            )
        if kind in ("caller", "assistant", "tool_result", "dtmf"):
            previous = t
    for began, name in tools.values():  # still running
        start = x(began)
        shapes.append(
            {
                "kind": "tool",
                "x": start,
                "y": ROWS["tool"],
                "w": max(3.0, x(t1) - start),
                "h": ROW_HEIGHT,
                "label": f"Tool {name} running",
            }
        )
    ticks = []
    step = next((s for s in (1, 5, 10, 30, 60, 300, 600, 1800, 3600) if span / s <= 10), 7200)
    for i in range(int(span // step) + 1):
        ticks.append({"x": x(t0 + i * step), "label": f"{i * step} s"})
    return {
        "shapes": shapes,
        "ticks": ticks,
        "rows": [
            {"label": label, "y": y + ROW_HEIGHT / 2 + 4}
            for label, y in (("Caller", ROWS["caller"]), ("Assistant", ROWS["assistant"]), ("Tools", ROWS["tool"]))
        ],
        "width": LEFT + WIDTH + 10,
        "height": HEIGHT,
        "barge_ins": sum(1 for s in shapes if s["kind"] == "barge_in"),
    }
