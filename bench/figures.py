"""One point's figures: from the files its processes wrote into its folder and the samples taken."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench import analysis
from bench.procs import Sample
from bench.sampler import NOISE_CORES

WARMUP_INDEX_BASE = 30_000
"""Call numbers of a warm-up wave, so its sessions are told apart from the measured ones."""


def count_log_levels(path: Path) -> dict[str, Any]:
    """Warnings and errors in the relay's output (JSON lines for the project; anything else counts)."""
    levels: dict[str, int] = {}
    samples: list[str] = []
    if not path.exists():
        return {"levels": levels, "samples": samples}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            level = str(entry.get("level", "?"))
            message = str(entry.get("msg", ""))
        except ValueError:
            level = "error" if ("Traceback" in line or "Error" in line) else "text"
            message = line
        levels[level] = levels.get(level, 0) + 1
        if level in ("warning", "error", "critical") and len(samples) < 10:
            samples.append(message[:200])
    return {"levels": levels, "samples": samples}


def analyse(
    kind: str,
    n: int,
    folder: Path,
    *,
    window: tuple[float, float],
    marks: tuple[dict[str, Sample], dict[str, Sample]],
    machine: tuple[tuple[float, float, float], tuple[float, float, float]],
    series: dict[str, list[Sample]],
    noisy: list[tuple[float, float]],
    idle: dict[str, Any],
    after: dict[str, Any],
    peak_kb: int | None,
    cpu_idle_start: Sample | None,
    setup_failed: int,
    redis_keys: int,
) -> dict[str, Any]:
    gen = json.loads((folder / "gen.json").read_text())
    sim = json.loads((folder / "sim.json").read_text())
    calls = gen["calls"]
    sessions = [s for s in sim["sessions"] if 0 <= s["call"] < WARMUP_INDEX_BASE]  # not the warm-up wave's
    w0, w1 = window
    up_pairs = analysis.load_pairs(folder / "sim.up.bin")
    down_pairs = analysis.load_pairs(folder / "gen.down.bin")
    up = analysis.window_ms(up_pairs, w0, w1)
    down = analysis.window_ms(down_pairs, w0, w1)
    mark_lat = analysis.window_ms(analysis.load_pairs(folder / "gen.marks.bin"), w0, w1)
    duration = w1 - w0
    noisy_in_window = [(max(a, w0), min(b, w1)) for a, b in noisy if b > w0 and a < w1]
    quiet_share = 1.0 - sum(b - a for a, b in noisy_in_window) / max(1e-9, duration)

    def cpu(name: str) -> dict[str, float] | None:
        a, b = marks[0].get(name), marks[1].get(name)
        if a is None or b is None or b.t <= a.t:
            return None
        used = b.cpu_s - a.cpu_s
        return {
            "core_share": round(used / (b.t - a.t), 3),
            "cpu_s": round(used, 2),
            "system_s": round(b.system_s - a.system_s, 2),
            "seconds": round(b.t - a.t, 2),
        }

    point: dict[str, Any] = {"kind": kind, "calls": n, "window_s": round(duration, 2)}
    relay_cpu = cpu("relay")
    point["cpu"] = {"relay": relay_cpu, "simulator": cpu("simulator"), "generator": cpu("generator")}
    (_, b0, t0), (_, b1, t1) = machine
    busy_cores = (b1 - b0) / max(1.0, t1 - t0) * (os.cpu_count() or 1)
    point["cpu"]["machine_busy_cores"] = round(busy_cores, 2)
    ours = sum(v["core_share"] for v in point["cpu"].values() if isinstance(v, dict))
    point["cpu"]["other_processes_cores"] = round(max(0.0, busy_cores - ours), 2)
    if relay_cpu is not None:
        point["cpu_ms_per_call_s"] = round(relay_cpu["cpu_s"] * 1000.0 / (n * relay_cpu["seconds"]), 4)
    relay_series = [s for s in series.get("relay", []) if w0 <= s.t <= w1]
    if relay_series and idle:
        steady_kb = sum(s.rss_kb for s in relay_series) / len(relay_series)
        point["rss"] = {
            "idle_kb": idle["rss_kb"],
            "steady_kb": round(steady_kb),
            "peak_kb": peak_kb,
            "after_kb": after.get("rss_kb"),
            "per_call_kb": round((steady_kb - idle["rss_kb"]) / n, 1),
        }
    point["latency_ms"] = {
        "caller_to_realtime": analysis.summarize(up),
        "realtime_to_caller": analysis.summarize(down),
        "mark_delivery": analysis.summarize(mark_lat),
    }
    point["quiet"] = {
        "share_of_window": round(quiet_share, 3),
        "noise_threshold_cores": NOISE_CORES,
        "caller_to_realtime": analysis.summarize(analysis.window_ms(up_pairs, w0, w1, exclude=noisy_in_window)),
        "realtime_to_caller": analysis.summarize(analysis.window_ms(down_pairs, w0, w1, exclude=noisy_in_window)),
    }
    sent_up = sum(c["frames_sent"] for c in calls)
    got_up = sum(s["received"] for s in sessions)
    sent_down = sum(s["chunks_sent"] for s in sessions)
    got_down = sum(c["deltas"] for c in calls)
    point["frames"] = {
        "caller_sent": sent_up,
        "realtime_received": got_up,
        "up_lost": sent_up - got_up,
        "up_reordered": sum(s["reordered"] for s in sessions),
        "up_gaps": sum(s["gaps"] for s in sessions),
        "up_unmarked": sum(s["unmarked"] for s in sessions),
        "realtime_chunks_sent": sent_down,
        "caller_received": got_down,
        "down_lost": sent_down - got_down,
        "down_reordered": sum(c["down_reordered"] for c in calls),
        "down_gaps": sum(c["down_gaps"] for c in calls),
        "crosstalk": sum(c["crosstalk"] for c in calls) + sum(s["crosstalk"] for s in sessions),
    }
    point["marks"] = {
        "received": sum(c["marks_in"] for c in calls),
        "echoed": sum(c["marks_echoed"] for c in calls),
    }
    reactions = analysis.barge_in_reactions(calls, sessions)
    point["barge_in"] = {
        "caller_barge_ins": sum(c["barge_ins"] for c in calls),
        "clears": sum(len(c["clears"]) for c in calls),
        "reaction_ms": analysis.summarize(reactions),
        "truncates_ok": sum(1 for s in sessions for t in s["truncates"] if t["ok"]),
        "truncates_refused": sum(1 for s in sessions for t in s["truncates"] if not t["ok"]),
    }
    errors = [c["error"] for c in calls if c["error"]]
    point["calls_ok"] = n - len(errors)
    point["call_errors"] = errors[:5]
    point["setup_failed"] = setup_failed
    point["sim_error_codes"] = sorted({code for s in sessions for code in s["errors"] if code})
    point["realtime_sessions"] = len(sessions)
    point["generator"] = {"tick_late": gen["tick_late"], "ticks": gen["ticks"]}
    gen_cpu = point["cpu"]["generator"]
    saturated = gen["tick_late"]["p99_ms"] > 5.0 or (gen_cpu is not None and gen_cpu["core_share"] > 0.9)
    point["generator"]["saturated"] = saturated
    point["machine_saturated"] = point["cpu"]["machine_busy_cores"] >= 1.9
    if kind != "direct":
        point["leaks"] = {
            "idle": {k: v for k, v in idle.items() if k != "task_names"},
            "after": {k: v for k, v in after.items() if k != "task_names"},
            "fds_left": (after.get("fds", 0) - after.get("redis_sockets", 0))
            - (idle.get("fds", 0) - idle.get("redis_sockets", 0)),
            "redis_pool_growth": after.get("redis_sockets", 0) - idle.get("redis_sockets", 0),
            "upstream_sockets_left": after.get("upstream_sockets"),
            "caller_sockets_left": after.get("caller_sockets"),
            "tasks_left": (after.get("tasks") or 0) - (idle.get("tasks") or 0),
            "active_calls_metric": after.get("active_calls_metric"),
            "task_names_after": after.get("task_names"),
        }
        point["log"] = count_log_levels(folder / "relay.log")
    if kind not in ("floor", "direct"):
        point["redis_keys"] = redis_keys
    if cpu_idle_start is not None:
        point["relay_cpu_before_calls_s"] = cpu_idle_start.cpu_s
    return point
