"""Soak: many calls for minutes against one worker with Redis on; what must hold afterwards.

Zero frames lost or reordered in either direction, zero warning or error lines in the relay's logs,
RSS, tasks and descriptors after the calls within 10 % of before (measured after a warm-up wave of the
same size, so "before" is a process that has served that many calls), and every call's record readable through
``GET /calls/{sid}`` with the API token.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bench.options import Options
from bench.procs import http_get
from bench.relay_under_test import RelayUnderTest
from bench.runner import run_point

TOLERANCE = 0.10


def _within(before: float | None, after: float | None, slack: float = 0.0) -> bool:
    if before is None or after is None:
        return False
    return after <= before * (1 + TOLERANCE) + slack


async def check_records(opts: Options, relay: RelayUnderTest, sids: list[str]) -> dict[str, Any]:
    """GET /calls/{sid} for every call; a record counts when it says how the call ended."""
    missing: list[str] = []
    incomplete: list[str] = []
    sem = asyncio.Semaphore(8)

    async def one(sid: str) -> None:
        async with sem:
            status, body = await http_get(
                "127.0.0.1", relay.http_port, f"/calls/{sid}", {"Authorization": f"Bearer {opts.api_token}"}
            )
        if status != 200:
            missing.append(f"{sid} ({status})")
            return
        record = json.loads(body)
        if not record.get("meta", {}).get("end_reason"):
            incomplete.append(sid)

    await asyncio.gather(*(one(sid) for sid in sids))
    return {"calls": len(sids), "missing": missing[:20], "missing_count": len(missing), "incomplete": incomplete[:20]}


async def soak(opts: Options, calls: int, seconds: float, warmup_s: float = 10.0) -> dict[str, Any]:
    opts.seconds = seconds

    async def inspect(relay: RelayUnderTest, sids: list[str]) -> dict[str, Any]:
        return await check_records(opts, relay, sids)

    # A first wave of the same size, so "before" is a process whose allocator has already held N calls:
    # a leak then shows as growth over the second wave, not as the allocator keeping its arenas.
    warmup = (calls, warmup_s)
    point = await run_point("project", calls, opts, warmup=warmup, inspect=inspect)
    leaks = point["leaks"]
    before, after = leaks["idle"], leaks["after"]
    records = point.get("inspected", {})
    levels = point["log"]["levels"]
    frames = point["frames"]
    checks = {
        "no_frames_lost_or_reordered": frames["up_lost"] == frames["up_reordered"] == 0
        and frames["down_lost"] == frames["down_reordered"] == 0
        and frames["up_gaps"] == frames["down_gaps"] == 0,
        "all_calls_completed": point["calls_ok"] == calls,
        "no_warning_or_error_lines": not any(levels.get(k) for k in ("warning", "error", "critical")),
        "rss_within_10pct": _within(before.get("rss_kb"), after.get("rss_kb")),
        "fds_within_10pct": _within(
            before.get("fds", 0) - before.get("redis_sockets", 0), after.get("fds", 0) - after.get("redis_sockets", 0)
        ),
        "tasks_within_10pct": _within(before.get("tasks"), after.get("tasks")),
        "no_call_sockets_left": after.get("upstream_sockets") == 0 and after.get("caller_sockets") == 0,
        "active_calls_zero": after.get("active_calls_metric") == 0,
        "every_record_in_redis": records.get("missing_count") == 0 and not records.get("incomplete"),
    }
    return {"point": point, "checks": checks, "passed": all(checks.values()), "warmup": warmup}


def soak_md(result: dict[str, Any], command: str) -> str:
    point = result["point"]
    leaks = point["leaks"]
    lines = [
        "# Soak",
        "",
        f"Command: `{command}`",
        "",
        f"{point['calls']} calls held {point['window_s']:.0f} s against one worker (Redis on, metrics on), after a "
        f"warm-up of {result['warmup'][0]} calls × {result['warmup'][1]:.0f} s. Result: "
        f"**{'PASSED' if result['passed'] else 'FAILED'}**",
        "",
        "| check | result |",
        "|---|---|",
    ]
    lines += [f"| {name.replace('_', ' ')} | {'ok' if ok else '**failed**'} |" for name, ok in result["checks"].items()]
    lines += [
        "",
        f"- frames: {json.dumps(point['frames'])}",
        f"- before: {json.dumps(leaks['idle'])}",
        f"- after: {json.dumps(leaks['after'])}",
        f"- log lines by level: {json.dumps(point['log']['levels'])}; samples: {json.dumps(point['log']['samples'])}",
        f"- call records: {json.dumps(point.get('inspected', {}))}",
        f"- CPU ms per call-second: {point.get('cpu_ms_per_call_s')}; RSS: {json.dumps(point.get('rss'))}",
        f"- latency ms: {json.dumps(point['latency_ms'])}",
        f"- call errors: {json.dumps(point['call_errors'])}",
    ]
    return "\n".join(lines) + "\n"
