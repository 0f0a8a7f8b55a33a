"""One measured point: a fresh simulator, a fresh relay and the load generator, each its own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.figures import WARMUP_INDEX_BASE, analyse
from bench.options import Options
from bench.procs import PY, Proc, free_port, status_kb
from bench.relay_under_test import RelayUnderTest, pin, redis_cleanup, relay_state, start_relay, wait_clean
from bench.sampler import NOISE_CORES, Sampler, redis_pids


def ramp_seconds(n: int) -> float:
    """Calls start over this long (about 80 set-ups a second, at most 5 s)."""
    return min(5.0, max(0.5, n / 80.0))


Inspect = Callable[[RelayUnderTest, list[str]], Awaitable[dict[str, Any]]]


async def _generate(
    kind: str,
    relay: RelayUnderTest,
    n: int,
    seconds: float,
    opts: Options,
    out: Path,
    settle_s: float,
    index_base: int = 0,
) -> Proc:
    args = [
        PY, "-m", "bench.generator", "--mode", "direct" if kind == "direct" else "twilio",
        "--target", relay.target, "--calls", str(n), "--hold", str(seconds),
        "--ramp", str(ramp_seconds(n)), "--settle", str(settle_s), "--barge-in", str(opts.barge_in),
        "--auth-token", opts.auth_token, "--out", str(out), "--seed", str(n), "--index-base", str(index_base),
    ]  # fmt: skip
    if relay.public_url:
        args += ["--public-url", relay.public_url]
    proc = await Proc.start("generator", args)
    pin(proc, "generator", opts)
    return proc


async def run_point(
    kind: str,
    n: int,
    opts: Options,
    *,
    warmup: tuple[int, float] | None = None,
    inspect: Inspect | None = None,
) -> dict[str, Any]:
    """Measure one relay at N calls. ``warmup`` (calls, seconds) runs first on the same relay process,
    so the idle figures are those of a process that has served calls; ``inspect`` runs once the calls
    have ended, before the relay stops (the soak reads the call records there)."""
    folder = (opts.out / "points" / f"{kind}-{n}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"bench:{opts.run_id}:{kind}{n}:"
    sim_port = free_port()
    redis_port = urlsplit(opts.redis_url).port or 6379
    sim = await Proc.start(
        "simulator",
        [
            PY, "-m", "bench.simproc", "--port", str(sim_port), "--out", str(folder / "sim"),
            "--reply-ms", str(opts.reply_ms), "--realtime-factor", str(opts.realtime_factor),
        ],
    )  # fmt: skip
    pin(sim, "simulator", opts)
    relay: RelayUnderTest | None = None
    gen: Proc | None = None
    profiler: Proc | None = None
    try:
        sim_url = (await sim.expect("READY", 30)).split()[1]
        relay = await start_relay(kind, opts, sim_url, folder, prefix)
        await asyncio.sleep(1.0)
        if warmup is not None and relay.proc is not None:
            cold = await relay_state(relay, sim_port, folder, redis_port)
            warm = await _generate(kind, relay, warmup[0], warmup[1], opts, folder / "warmup", 1.0, WARMUP_INDEX_BASE)
            await warm.expect('{"event": "done"', warmup[1] + 120)
            await warm.stop()
            await wait_clean(relay, sim_port, cold, folder, redis_port)
        idle = await relay_state(relay, sim_port, folder, redis_port) if relay.proc is not None else {}
        cpu_idle_start = relay.proc.sample() if relay.proc is not None else None
        procs: dict[str, Proc] = {"simulator": sim}
        if relay.proc is not None:
            procs["relay"] = relay.proc
        gen = await _generate(kind, relay, n, opts.seconds, opts, folder / "gen", opts.gen_settle_s)
        procs["generator"] = gen
        with Sampler(procs, redis_pids(opts.redis_url) if kind not in ("floor", "direct") else ()) as sampler:
            steady = json.loads(await gen.expect('{"event": "steady"', ramp_seconds(n) + 90))
            await asyncio.sleep(opts.settle_s)
            mark0 = sampler.take()
            m0 = sampler.machine[-1]
            if opts.profile and relay.proc is not None:
                profiler = await Proc.start(
                    "py-spy",
                    [
                        "py-spy", "record", "-p", str(relay.proc.pid), "-d", str(max(1, int(opts.seconds - 2))),
                        "-r", "250", "-f", "raw", "-o", str(opts.out / f"profile-{kind}-{n}.txt"),
                        *(["--native"] if os.environ.get("BENCH_PYSPY_NATIVE") else []),
                    ],
                    log_path=folder / "py-spy.log",
                )  # fmt: skip
            hang = json.loads(await gen.expect('{"event": "hangup"', opts.seconds + 120))
            mark1 = sampler.take()
            m1 = sampler.machine[-1]
            await gen.expect('{"event": "done"', 120)
            await gen.proc.wait()
        after = await wait_clean(relay, sim_port, idle, folder, redis_port) if relay.proc is not None else {}
        inspected: dict[str, Any] = {}
        if inspect is not None and relay.proc is not None:
            sids = [c["call_sid"] for c in json.loads((folder / "gen.json").read_text())["calls"]]
            inspected = await inspect(relay, sids)
        if profiler is not None:
            await profiler.stop(timeout=30)
        peak_kb = None
        if relay.proc is not None:
            peak_kb = status_kb(relay.proc.pid).get("VmHWM")
    finally:
        for proc in (gen, profiler):
            if proc is not None:
                await proc.stop(timeout=10)
        if relay is not None and relay.proc is not None:
            await relay.proc.stop(timeout=40)
        with contextlib.suppress(Exception):
            if sim.alive():
                sim.proc.send_signal(15)
                await sim.expect("DUMPED", 60)
        await sim.stop(timeout=20)
    removed = 0
    if kind not in ("floor", "direct"):
        with contextlib.suppress(Exception):
            removed = redis_cleanup(opts.redis_url, prefix)
    point = analyse(
        kind,
        n,
        folder,
        window=(steady["t"] + opts.settle_s, hang["t"]),
        marks=(mark0, mark1),
        machine=(m0, m1),
        series=sampler.series,
        noisy=sampler.noisy_intervals(NOISE_CORES),
        idle=idle,
        after=after,
        peak_kb=peak_kb,
        cpu_idle_start=cpu_idle_start,
        setup_failed=int(steady.get("setup_failed", 0)),
        redis_keys=removed,
    )
    if inspected:
        point["inspected"] = inspected
    return point
