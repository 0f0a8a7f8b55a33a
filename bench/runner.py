"""One measured point: a fresh simulator, a fresh relay and the load generator, each its own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import analysis
from bench.procs import (
    Proc,
    Sample,
    cpu_seconds,
    fd_count,
    free_port,
    http_get,
    machine_busy,
    metric_value,
    sockets,
    wait_http,
)

PY = sys.executable
RELAYS = ("floor", "project")
KINDS = ("direct", *RELAYS)


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
    """How the relay gets its CPU: "priority", "cpu" or "none" (see pin())."""
    variants: dict[str, str] = field(default_factory=dict)
    """Extra relay kinds: name -> a source tree of this project, run like "project" (A/B of changes)."""


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


def pin(proc: Proc, role: str, opts: Options) -> None:
    """Give the relay the CPU first, as a worker with a core of its own would have it.

    Default ("priority"): the relay runs SCHED_RR (real-time round robin; nice -10 where that is not
    allowed), so whenever it has work it preempts the generator and the simulator, which use what
    CPU is left on both cores. Without this, three busy processes time-sliced over two CPUs add
    scheduler waits of several ms to the relay's figures that production does not have. It changes
    no CPU figure: a relay only ever uses one core. "cpu": the relay on one CPU, the generator and
    the simulator on the other. Processes outside the bench are untouched (their load is reported)."""
    if opts.pin == "none" or (role != "relay" and opts.pin != "cpu"):
        return
    if opts.pin == "cpu":
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {cpus[-1]} if role == "relay" else set(cpus[:-1]))
        return
    try:
        os.sched_setscheduler(proc.pid, os.SCHED_RR, os.sched_param(10))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, -10)


def ramp_seconds(n: int) -> float:
    """Calls start over this long (about 80 set-ups a second, at most 5 s)."""
    return min(5.0, max(0.5, n / 80.0))


def project_env(opts: Options, port: int, sim_url: str, prefix: str) -> dict[str, str]:
    """The production settings of the README, pointed at loopback: one worker, Redis, metrics on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TWILIO_", "RELAY_", "REDIS_"))}
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "TWILIO_AUTH_TOKEN": opts.auth_token,
            "RELAY_STREAM_SECRET": opts.stream_secret,
            "OPENAI_API_KEY": "sk-bench-" + opts.run_id,
            "OPENAI_REALTIME_URL": sim_url,
            "REDIS_URL": opts.redis_url,
            "RELAY_REDIS_PREFIX": prefix,
            "RELAY_METRICS": "1",
            "RELAY_API_TOKEN": opts.api_token,
            "RELAY_CALLER_MEMORY": "1" if opts.caller_memory else "0",
            "RELAY_GREETING": "",  # the floor does not greet: both relays carry the same audio
            "MAX_CALLS": "5000",
            "WEB_CONCURRENCY": "1",
            "LOG_LEVEL": "info",
        }
    )
    return env


def redis_cleanup(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        return len(keys)
    finally:
        client.close()


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


async def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@dataclass
class RelayUnderTest:
    kind: str
    proc: Proc | None
    target: str
    public_url: str | None
    twilio_port: int
    http_port: int


async def start_relay(kind: str, opts: Options, sim_url: str, folder: Path, prefix: str) -> RelayUnderTest:
    env = dict(os.environ)
    env["BENCH_TASKS_FILE"] = str(folder / "tasks.json")
    if kind == "direct":
        return RelayUnderTest(kind, None, sim_url, None, 0, 0)
    if kind == "floor":
        port = free_port(pair=True)
        proc = await Proc.start(
            "floor",
            [PY, "-m", "bench.floor", "--port", str(port), "--upstream", sim_url],
            env=env,
            log_path=folder / "relay.log",
        )
        pin(proc, "relay", opts)
        await _wait_port(port + 1, 20)
        return RelayUnderTest(kind, proc, f"http://127.0.0.1:{port}", None, port + 1, port)
    port = free_port()
    env = project_env(opts, port, sim_url, prefix)
    env["BENCH_TASKS_FILE"] = str(folder / "tasks.json")
    source = opts.variants.get(kind)
    if source is not None:  # a copy of this repository with other relay code (before/after comparisons)
        env["PYTHONPATH"] = source
    proc = await Proc.start(
        kind, [PY, "-m", "bench.tasks", "serve"], env=env, log_path=folder / "relay.log", cwd=source
    )
    pin(proc, "relay", opts)
    await wait_http("127.0.0.1", port, "/healthz", 30)
    base = f"http://127.0.0.1:{port}"
    return RelayUnderTest(kind, proc, base, base, port, port)


async def relay_state(relay: RelayUnderTest, sim_port: int, folder: Path, redis_port: int) -> dict[str, Any]:
    """Descriptors, sockets by peer, tasks and (project) active calls of the relay process."""
    assert relay.proc is not None
    pid = relay.proc.pid
    socks = sockets(pid)
    upstream = [s for s in socks if s[1] == sim_port]
    callers = [s for s in socks if s[0] in (relay.twilio_port, relay.http_port) and s[2] != "LISTEN"]
    store = [s for s in socks if s[1] == redis_port]
    state: dict[str, Any] = {
        "fds": fd_count(pid),
        "upstream_sockets": len(upstream),
        "caller_sockets": len(callers),
        "redis_sockets": len(store),
        "other_sockets": len(socks) - len(upstream) - len(callers) - len(store),
        "rss_kb": relay.proc.sample().rss_kb,
    }
    tasks = await relay.proc.task_snapshot(folder / "tasks.json")
    state["tasks"] = tasks.get("tasks") if tasks else None
    state["task_names"] = tasks.get("by_name") if tasks else None
    state["gc"] = tasks.get("gc") if tasks else None
    if relay.kind != "floor":
        with contextlib.suppress(OSError, TimeoutError):
            status, body = await http_get("127.0.0.1", relay.http_port, "/metrics")
            if status == 200:
                state["active_calls_metric"] = metric_value(body.decode(), "relay_active_calls")
    return state


async def wait_clean(
    relay: RelayUnderTest, sim_port: int, idle: dict[str, Any], folder: Path, redis_port: int
) -> dict[str, Any]:
    """After the calls end: poll until no call socket is left (or 20 s), then report what is left.

    Redis connections are counted apart: the client's pool may keep one more idle connection than
    before the calls, which is a pool, not a call left behind.
    """
    started = time.monotonic()
    state: dict[str, Any] = {}
    while time.monotonic() - started < 20:
        state = await relay_state(relay, sim_port, folder, redis_port)
        clean = state["upstream_sockets"] == 0 and state["caller_sockets"] == 0
        fds = state["fds"] - state["redis_sockets"]
        clean = clean and fds <= idle["fds"] - idle["redis_sockets"] and state.get("tasks") == idle.get("tasks")
        if relay.kind != "floor":
            clean = clean and state.get("active_calls_metric") == 0
        if clean:
            break
        await asyncio.sleep(0.5)
    state["seconds_to_clean"] = round(time.monotonic() - started, 1)
    return state


Inspect = Callable[[RelayUnderTest, list[str]], Awaitable[dict[str, Any]]]


WARMUP_INDEX_BASE = 30_000
"""Call numbers of a warm-up wave, so its sessions are told apart from the measured ones."""


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
            from bench.procs import status_kb

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
        opts,
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


def analyse(
    kind: str,
    n: int,
    opts: Options,
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
