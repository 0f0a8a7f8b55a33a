"""The relay under test (the floor, this project, or none for the direct path): started, given the CPU
first, inspected, and its Redis keys removed after the point.

``relay_state`` counts what the relay process holds (descriptors, sockets by peer, tasks, active
calls); ``wait_clean`` polls it after the calls until nothing of theirs is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.options import Options
from bench.procs import PY, Proc, fd_count, free_port, http_get, metric_value, sockets, wait_http, wait_port


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
        await wait_port(port + 1, 20)
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
