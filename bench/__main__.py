"""``python -m bench``: this relay against the floor relay, interleaved, at each N; or ``soak``.

    python -m bench                         # full run, ~15 min: N = 10,50,100,200,300,400
    python -m bench --quick                 # N = 10,50,100, 8 s each
    python -m bench --calls 100,200 --seconds 20 --relays project
    python -m bench soak --calls 300 --seconds 300
    python -m bench report bench/out        # re-render results.md and plots from results.json

Every point starts a fresh Realtime simulator, a fresh relay and the load generator, each in its own
process (method and figures: bench/RESULTS.md). Output goes to bench/out/ (results.json, results.md,
cpu.png, latency.png, and per point the raw files in points/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.options import RELAYS, Options
from bench.procs import machine_busy
from bench.runner import run_point
from bench.soak import soak, soak_md

DEFAULT_CALLS = "10,50,100,200,300,400"


async def quiet_machine(max_wait_s: float, threshold_cores: float = 0.3) -> float:
    """Wait (up to max_wait_s) until other processes use less than threshold_cores; return their load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = machine_busy()
        await asyncio.sleep(2.0)
        b1, t1 = machine_busy()
        load = (b1 - b0) / max(1.0, t1 - t0) * 2.0
        if load < threshold_cores or time.monotonic() >= deadline:
            return round(load, 2)
        print(f"  machine busy ({load:.2f} cores used by other processes); waiting", flush=True)


def _line(point: dict[str, Any]) -> str:
    lat = point["latency_ms"]
    cpu = point.get("cpu_ms_per_call_s")
    return (
        f"  {point['kind']:>7} N={point['calls']:<4} cpu {cpu if cpu is not None else '-':>7} ms/call-s  "
        f"p99 up {lat['caller_to_realtime']['p99']} down {lat['realtime_to_caller']['p99']} ms  "
        f"ok {point['calls_ok']}/{point['calls']}  other load {point['cpu']['other_processes_cores']} cores"
    )


async def sweep(opts: Options, quiet_wait_s: float) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = []
    for i, n in enumerate(opts.calls):
        relays = list(opts.relays) if i % 2 == 0 else list(reversed(opts.relays))
        kinds = (["direct"] if opts.baseline else []) + relays
        for kind in kinds:
            before = await quiet_machine(quiet_wait_s)
            print(f"[{time.strftime('%H:%M:%S')}] {kind} N={n} (other load before: {before} cores)", flush=True)
            point = await run_point(kind, n, opts)
            point["other_load_before_cores"] = before
            points.append(point)
            print(_line(point), flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in argv)])
    mode = "run"
    if argv and argv[0] in ("run", "soak", "report"):
        mode = argv.pop(0)
    parser = argparse.ArgumentParser(prog=f"python -m bench {mode}", description=__doc__.splitlines()[0])
    if mode == "report":
        parser.add_argument("out", nargs="?", default="bench/out")
        args = parser.parse_args(argv)
        out = Path(args.out)
        results = json.loads((out / "results.json").read_text())
        print(report.write(results, out))
        return 0
    parser.add_argument("--calls", default=None, help=f"comma-separated N (default {DEFAULT_CALLS}; soak: 300)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds every call is up per point (default 25)")
    parser.add_argument("--quick", action="store_true", help="N = 10,50,100 for 8 s each")
    parser.add_argument("--relays", default=",".join(RELAYS), help="floor,project (interleaved per N)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the direct (no relay) path")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--reply-ms", type=int, default=3000, help="length of each simulated answer")
    parser.add_argument("--realtime-factor", type=float, default=4.0, help="answer generation speed vs real time")
    parser.add_argument("--barge-in", type=float, default=0.35, help="share of answers the caller interrupts")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--profile", action="store_true", help="py-spy record the project relay at every point")
    parser.add_argument(
        "--pin",
        choices=("priority", "cpu", "none"),
        default="priority",
        help="relay CPU: real-time priority (default), a CPU of its own, or shared like the rest",
    )
    parser.add_argument("--warmup-seconds", type=float, default=10.0, help="soak: length of the first wave")
    parser.add_argument("--loop-lag", action="store_true", help="diagnostics: time the relays' event-loop stalls")
    parser.add_argument("--no-caller-memory", action="store_true", help="RELAY_CALLER_MEMORY=0 for the project")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run the project from source tree DIR as relay NAME (add NAME to --relays)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "soak":
        calls = [int(args.calls or 300)]
        seconds = args.seconds or 300.0
    elif args.quick:
        calls = [int(n) for n in (args.calls or "10,50,100").split(",")]
        seconds = args.seconds or 8.0
    else:
        calls = [int(n) for n in (args.calls or DEFAULT_CALLS).split(",")]
        seconds = args.seconds or 25.0
    opts = Options(
        calls=calls,
        seconds=seconds,
        relays=tuple(r for r in args.relays.split(",") if r),
        baseline=not args.no_baseline,
        out=out,
        redis_url=args.redis_url,
        reply_ms=args.reply_ms,
        realtime_factor=args.realtime_factor,
        barge_in=args.barge_in,
        profile="py-spy" if args.profile else None,
        caller_memory=not args.no_caller_memory,
        pin=args.pin,
        variants=dict(v.split("=", 1) for v in args.variant),
    )
    if args.loop_lag:
        os.environ["BENCH_LOOP_LAG"] = "1"  # inherited by the relays; see bench.tasks
    started = time.time()
    machine = report.machine_details(opts.redis_url)
    if mode == "soak":
        result = asyncio.run(_soak(opts, calls[0], seconds, args.quiet_wait, args.warmup_seconds))
        result.update({"command": command, "machine": machine, "started": started})
        (out / "soak.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "soak.md").write_text(soak_md(result, command))
        print((out / "soak.md").read_text())
        return 0 if result["passed"] else 1
    points = asyncio.run(sweep(opts, args.quiet_wait))
    results = {
        "command": command,
        "machine": machine,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started),
        "options": {k: v for k, v in vars(opts).items() if k not in ("auth_token", "stream_secret", "api_token")},
        "points": points,
    }
    path = report.write(results, out)
    print(path.read_text())
    return 0


async def _soak(opts: Options, calls: int, seconds: float, quiet_wait_s: float, warmup_s: float) -> dict[str, Any]:
    before = await quiet_machine(quiet_wait_s)
    result = await soak(opts, calls, seconds, warmup_s)
    result["other_load_before_cores"] = before
    return result


if __name__ == "__main__":
    raise SystemExit(main())
