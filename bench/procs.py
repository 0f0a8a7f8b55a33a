"""Processes under test: start, wait ready, read their cost from /proc, stop.

CPU is utime+stime from ``/proc/<pid>/stat`` (clock ticks), memory is VmRSS / VmHWM from
``/proc/<pid>/status``, descriptors are ``/proc/<pid>/fd``; sockets are classified by joining the
socket inodes of ``/proc/<pid>/fd`` with ``/proc/<pid>/net/tcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PY = sys.executable
"""The interpreter every bench process runs with."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            out[name] = int(value.split()[0])
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return float(total - idle), float(total)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket the process holds."""
    inodes: set[str] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: list[tuple[int, int, str]] = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes:
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                found.append((local, remote, _TCP_STATES.get(parts[3], parts[3])))
    return found


def free_port(pair: bool = False) -> int:
    """A free loopback port (and the one above it, when ``pair``)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not pair:
            return port
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss_kb: int
    system_s: float = 0.0


class Proc:
    """A child process; stdout to a file or read line by line; stopped by its own pid only."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: IO[bytes] | None) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.log = log

    @classmethod
    async def start(
        cls,
        name: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        cwd: str | None = None,
    ) -> Proc:
        log = _open_log(log_path) if log_path is not None else None
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=log if log is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if log is not None else None,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        return cls(name, proc, log)

    async def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"{self.name} exited ({await self.proc.wait()}) before saying what was expected")
        return line.decode().strip()

    async def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = await self.readline(max(0.1, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line

    def alive(self) -> bool:
        return self.proc.returncode is None

    def sample(self) -> Sample:
        user, system = cpu_split(self.pid)
        return Sample(time.monotonic(), user + system, status_kb(self.pid).get("VmRSS", 0), system)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                print(f"  {self.name} (pid {self.pid}) ignored {signal.Signals(sig).name}; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
        return self.proc.returncode if self.proc.returncode is not None else -1

    async def task_snapshot(self, path: Path, timeout: float = 3.0) -> dict[str, object] | None:
        """Ask a process running bench.tasks for its asyncio task count (SIGUSR1)."""
        _remove(path)
        if self.proc.returncode is not None:
            return None
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = _read_json(path)
            if data is not None:
                return data
            await asyncio.sleep(0.05)
        return None


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


async def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Minimal HTTP/1.1 GET with Connection: close (no client library, no pooled sockets left open)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}Connection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)


async def wait_port(port: int, timeout: float) -> None:
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


async def wait_http(host: str, port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = await http_get(host, port, path)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"http://{host}:{port}{path} did not answer 200 within {timeout:.0f} s")
        await asyncio.sleep(0.1)


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            with contextlib.suppress(ValueError):
                return float(line.rsplit(" ", 1)[1])
    return None
