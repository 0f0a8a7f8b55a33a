"""Helpers of the operations tests: Prometheus text parsing, and the relay as a real subprocess.

``RelayProcess`` runs ``python -m relay serve`` (one or several workers) with its output
captured: the same entry point, signals and uvicorn set-up as production, talking to a
Realtime simulator that runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from conftest import API_KEY, AUTH_TOKEN, free_port
from prometheus_client.parser import text_string_to_metric_families

from relay.sim import ulaw
from relay.sim.caller import CallerConfig, SimulatedCaller

ROOT = Path(__file__).resolve().parent.parent
STREAM_SECRET = "drain-test-stream-secret-5b1e0c9a4f7d2e8b"
API_TOKEN = "ops-test-api-token-7c2d1f3e8a9b4c5d6e0f"
_INHERITED_PREFIXES = ("RELAY_", "OPENAI_", "TWILIO_", "AZURE_OPENAI_")
_INHERITED_NAMES = {
    "REDIS_URL",
    "PUBLIC_URL",
    "PORT",
    "HOST",
    "MAX_CALLS",
    "DRAIN_SECONDS",
    "LOG_LEVEL",
    "WEB_CONCURRENCY",
    "PROMETHEUS_MULTIPROC_DIR",
    "FORWARDED_ALLOW_IPS",
}

Samples = list[tuple[str, dict[str, str], float]]


def parse_metrics(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample; raises if the text is not Prometheus exposition format."""
    types: dict[str, str] = {}
    samples: Samples = []
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return types, samples


def metric(samples: Samples, name: str, /, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))


class RelayProcess:
    """Start with ``await proc.start()``; ``proc.lines`` are the parsed JSON log lines of stdout."""

    def __init__(self, realtime_url: str, *, args: tuple[str, ...] = (), **env: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        clean = {
            k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES) and k not in _INHERITED_NAMES
        }
        self.env = {
            **clean,
            "PYTHONUNBUFFERED": "1",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PUBLIC_URL": self.base_url,
            "OPENAI_API_KEY": API_KEY,
            "OPENAI_REALTIME_URL": realtime_url,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "RELAY_STREAM_SECRET": STREAM_SECRET,
            "RELAY_API_TOKEN": API_TOKEN,
            "RELAY_CALLER_MEMORY": "0",
            "RELAY_START_TIMEOUT": "2",
            "RELAY_RECONNECT_BACKOFF": "0.05",
            **env,
        }
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers: list[threading.Thread] = []

    def _launch(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so teardown also reaches the workers
        )

    async def start(self, timeout: float = 20.0) -> RelayProcess:
        """Launch and wait until /healthz answers."""
        self.proc = self._launch()
        for pipe, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            reader = threading.Thread(target=_pump, args=(pipe, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.output()[-3000:]}")
                try:
                    if (await http.get(self.base_url + "/healthz")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"relay did not answer /healthz: {self.output()[-3000:]}")
                await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        code = self.proc.poll()
        if code is not None:
            for reader in self._readers:
                reader.join(timeout=5)
        return code

    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Every stdout line parsed as one JSON object (raises on a line that is not one)."""
        parsed = []
        for line in self.stdout:
            value = orjson.loads(line)
            assert isinstance(value, dict), line
            parsed.append(value)
        return parsed

    async def close(self) -> None:
        """Test teardown: make sure nothing is left running."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started: parent and workers
        except ProcessLookupError:
            pass
        await self.wait(10)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
            return await http.get(self.base_url + path, **kwargs)


def _pump(pipe: Any, sink: list[str]) -> None:
    for raw in iter(pipe.readline, b""):
        sink.append(raw.decode("utf-8", errors="replace").rstrip("\n"))
    pipe.close()


def caller_for(relay: RelayProcess, **overrides: Any) -> SimulatedCaller:
    """A caller whose first frame is unique (near-silent noise), so its Realtime session can be found."""
    caller = SimulatedCaller(CallerConfig(base_url=relay.base_url, auth_token=AUTH_TOKEN, **overrides))
    noise = random.Random(caller.call_sid)
    caller.say(bytes(noise.choice((0xFF, 0xFE, 0x7F, 0x7E)) for _ in range(ulaw.FRAME_BYTES)))
    return caller
