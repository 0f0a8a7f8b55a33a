"""Shared test fixtures. Redis: a shared server for ordinary tests, private ones for fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from relay.config import Settings
from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig

# Which Redis the suite shares with whatever else runs on this machine, and which databases it uses
# there (tests add per-test key prefixes and delete only their own keys; nothing is flushed).
REDIS_URL_ENV = "RELAY_TEST_REDIS_URL"  # server, without a database number
REDIS_DB_ENV = "RELAY_TEST_REDIS_DB"  # database of the ordinary tests
BENCH_REDIS_DB_ENV = "RELAY_TEST_BENCH_REDIS_DB"  # database of the benchmark smoke tests
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DEFAULT_DB = 15
DEFAULT_BENCH_DB = 14


def shared_redis_server(env: Mapping[str, str] = os.environ) -> str:
    """The shared Redis server's URL (no database): RELAY_TEST_REDIS_URL, else 127.0.0.1:6379."""
    url = env.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise pytest.UsageError(f"{REDIS_URL_ENV} must be a redis:// or rediss:// URL, got {url!r}")
    if parts.path.strip("/"):
        raise pytest.UsageError(
            f"{REDIS_URL_ENV} names the server only; choose databases with {REDIS_DB_ENV} "
            f"and {BENCH_REDIS_DB_ENV} (got {url!r})"
        )
    return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


def redis_db_from_env(name: str = REDIS_DB_ENV, default: int = DEFAULT_DB, env: Mapping[str, str] = os.environ) -> int:
    """A database number from the environment (RELAY_TEST_REDIS_DB, RELAY_TEST_BENCH_REDIS_DB)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise pytest.UsageError(f"{name} must be a Redis database number, got {raw!r}")
    return int(raw)


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it; small race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_answers(host: str, port: int) -> bool:
    return redis_url_answers(f"redis://{host}:{port}")


def redis_url_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "no Redis on 127.0.0.1:6379 and no `redis-server` on PATH: "
            "install Redis (e.g. apt-get install redis-server) to run the Redis tests"
        )
    return binary


class RedisProcess:
    """A redis-server subprocess a test may kill, pause or restart without touching others."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._binary = _redis_server_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.start()

    def start(self) -> None:
        """Launch with no persistence (a restart starts empty) and wait until it answers PING."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen(
            [self._binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_answers("127.0.0.1", self.port):
            if self._proc.poll() is not None:
                pytest.fail(f"redis-server on port {self.port} exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server on port {self.port} did not answer PING within 10 s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the abrupt failure clients see when a Redis host dies."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None
        self._paused = False

    def restart(self) -> None:
        """Kill if running, then start an empty server on the same port."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server accepts TCP connections but answers nothing (a stalled Redis)."""
        assert self._proc is not None, "redis-server is not running"
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self._proc is not None and self._paused:
            os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        self.resume()
        self.kill()


@contextlib.contextmanager
def shared_redis_url(db: int) -> Iterator[str]:
    """Database `db` of the shared Redis server if it answers, else of a throwaway redis-server."""
    server_url = shared_redis_server()
    if redis_url_answers(server_url):
        yield f"{server_url}/{db}"
        return
    server = RedisProcess()
    try:
        yield f"redis://127.0.0.1:{server.port}/{db}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """Redis for ordinary tests: database RELAY_TEST_REDIS_DB (15) of the shared server."""
    with shared_redis_url(redis_db_from_env()) as url:
        yield url


@pytest.fixture
def store_prefix() -> str:
    """A key prefix unique to this test, so tests can share one Redis and clean up exactly."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def redis_url(redis_server_url: str, store_prefix: str) -> Iterator[str]:
    """The shared Redis URL; deletes every `store_prefix*` key after the test."""
    yield redis_server_url
    client = redis.Redis.from_url(redis_server_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{store_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """A dedicated redis-server (`.url`, `.port`, `.kill()`, `.restart()`, `.pause()`, `.resume()`)."""
    server = RedisProcess()
    try:
        yield server
    finally:
        server.stop()


# ---- relay, Realtime simulator and simulated caller on loopback --------------------------------

AUTH_TOKEN = "test-auth-token-5f2b9c0e7d"
API_KEY = "sk-test-9f8e7d6c5b4a39281706"


async def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll a condition the test cannot await (state owned by another task), up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


def assert_relayed_across_sessions(first: Any, second: Any, sent: list[str]) -> None:
    """Nothing lost across a Realtime session change: the old session heard a prefix of the caller's
    frames, the new one a contiguous run to the end that starts no later than where the old one stopped
    (recent audio is replayed into it, so frames in flight at the change are not lost)."""
    assert first.appended == sent[: len(first.appended)]
    start = len(sent) - len(second.appended)
    assert second.appended == sent[start:]
    assert start <= len(first.appended)


def relay_settings(realtime_url: str, **overrides: Any) -> Settings:
    base = Settings(
        openai_api_key=API_KEY,
        realtime_url=realtime_url,
        twilio_auth_token=AUTH_TOKEN,
        stream_secret=b"test-stream-secret-0123456789",
        caller_memory=False,
        start_timeout_s=2.0,
        session_update_timeout_s=3.0,
        reconnect_backoff_s=0.05,
        relay_api_token="test-api-token-abcdef0123456789abcdef",
    )
    return dataclasses.replace(base, **overrides)


def make_caller(relay: LocalRelay, **overrides: Any) -> SimulatedCaller:
    overrides.setdefault("auth_token", AUTH_TOKEN)
    config = CallerConfig(base_url=relay.base_url, **overrides)
    return SimulatedCaller(config)


async def greeted(relay: LocalRelay, *, heard_ms: int = 200, **overrides: Any) -> SimulatedCaller:
    """A caller on the line who has heard the whole greeting (at least `heard_ms` of it)."""
    caller = make_caller(relay, **overrides)
    await caller.connect()
    assert await caller.wait_for_audio(heard_ms, timeout=5)
    assert await caller.wait_idle(timeout=5)
    return caller


async def talk(caller: SimulatedCaller, ms: int = 600, seed: int = 0) -> None:
    """One caller turn and the assistant's whole answer."""
    before = caller.played_bytes
    await caller.say_and_wait(ulaw.synth_speech(ms, seed=seed))
    await caller.wait_for_audio(before // 8 + 300, timeout=10)
    await caller.wait_idle(timeout=10)


@pytest.fixture
async def sim() -> AsyncIterator[RealtimeSimulator]:
    simulator = RealtimeSimulator(SimConfig(realtime_factor=8.0))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def fast_sim() -> AsyncIterator[RealtimeSimulator]:
    """A simulator with short answers (400 ms greeting, 500 ms replies), for tests of whole calls."""
    simulator = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=400, reply_ms=500))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def relay(sim: RealtimeSimulator) -> AsyncIterator[LocalRelay]:
    async with LocalRelay(relay_settings(sim.url)) as running:
        yield running
