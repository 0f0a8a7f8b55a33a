"""The project's Realtime simulator in its own process, with the bench's latency probe attached.

``python -m bench.simproc --out PREFIX`` prints ``READY <url>`` once listening; on SIGTERM or SIGINT it
writes what the probe saw (``PREFIX.up.bin``: (send µs, arrival µs) pairs of every marked caller
frame; ``PREFIX.json``: per session counts, speech_started times, truncations) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

from bench import markers, tasks
from relay.sim.realtime import RealtimeSimulator, SimConfig, SimSession


@dataclass
class _Seen:
    call: int = markers.NO_CALL
    received: int = 0
    unmarked: int = 0
    last_seq: int = 0
    first_seq: int = 0
    gaps: int = 0
    reordered: int = 0
    crosstalk: int = 0
    chunks_sent: int = 0
    chunks_unmarked: int = 0
    seqs: list[int] = field(default_factory=list)


class BenchProbe:
    """relay.sim.realtime.LatencyProbe: reads caller markers on arrival, stamps every reply chunk."""

    def __init__(self) -> None:
        self.up_pairs: array[int] = array("q")
        self.seen: dict[str, _Seen] = {}

    def _get(self, session: SimSession) -> _Seen:
        seen = self.seen.get(session.id)
        if seen is None:
            seen = self.seen[session.id] = _Seen()
        return seen

    def appended(self, session: SimSession, audio: bytes) -> None:
        arrived = markers.now_us()
        seen = self._get(session)
        found = markers.decode(markers.UP_MAGIC, audio)
        if found is None:
            seen.unmarked += 1
            return
        call, seq, stamp = found
        if seen.call == markers.NO_CALL:
            seen.call = call
            seen.first_seq = seq
        elif call != seen.call:
            seen.crosstalk += 1
        seen.received += 1
        if seq <= seen.last_seq:
            seen.reordered += 1
        elif seen.last_seq and seq > seen.last_seq + 1:
            seen.gaps += seq - seen.last_seq - 1
        if seq > seen.last_seq:
            seen.last_seq = seq
        pairs = self.up_pairs
        pairs.append(stamp)
        pairs.append(arrived)

    def outgoing(self, session: SimSession, chunk: bytes) -> bytes:
        seen = self._get(session)
        seen.chunks_sent += 1
        if len(chunk) < markers.MARKER_LEN:
            seen.chunks_unmarked += 1
            return chunk
        marker = markers.encode(markers.DOWN_MAGIC, seen.call, seen.chunks_sent, markers.now_us())
        return marker + chunk[markers.MARKER_LEN :]


def _is_error(event: dict[str, Any]) -> bool:
    return event.get("type") == "error" and isinstance(event.get("error"), dict)


def dump(sim: RealtimeSimulator, probe: BenchProbe, prefix: str) -> None:
    with open(prefix + ".up.bin", "wb") as fh:
        probe.up_pairs.tofile(fh)
    sessions: list[dict[str, Any]] = []
    for rec in sim.sessions:
        seen = probe.seen.get(rec.id, _Seen())
        sessions.append(
            {
                "id": rec.id,
                "call": seen.call,
                "appends": rec.append_count,
                "received": seen.received,
                "unmarked": seen.unmarked,
                "first_seq": seen.first_seq,
                "last_seq": seen.last_seq,
                "gaps": seen.gaps,
                "reordered": seen.reordered,
                "crosstalk": seen.crosstalk,
                "chunks_sent": seen.chunks_sent,
                "chunks_unmarked": seen.chunks_unmarked,
                "speech_started": rec.speech_started_at,
                "turns": rec.turns,
                "responses": len(rec.responses),
                "truncates": [{k: t.get(k) for k in ("audio_end_ms", "sent_ms", "ok", "at")} for t in rec.truncates],
                "errors": [e["error"].get("code") for e in rec.sent if _is_error(e)],
                "closed": rec.closed,
            }
        )
    with open(prefix + ".json", "w") as fh:
        json.dump({"sessions": sessions, "connections": sim.connections, "gc": tasks.snapshot()["gc"]}, fh)


async def serve(args: argparse.Namespace) -> None:
    probe = BenchProbe()
    config = SimConfig(
        reply_ms=args.reply_ms,
        realtime_factor=args.realtime_factor,
        record_audio=False,
        latency_probe=probe,
        # Frame accounting owes the caller every chunk sent; late deltas of a cancelled response are
        # dropped by a correct relay and would count as lost. Their handling is the tests' job.
        late_audio_deltas=0,
    )
    sim = RealtimeSimulator(config)
    url = await sim.start(args.host, args.port)
    tasks.install()
    tasks.quiet_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {url}", flush=True)
    await stop.wait()
    dump(sim, probe, args.out)
    print("DUMPED", flush=True)
    await asyncio.wait_for(sim.stop(), 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simproc", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reply-ms", type=int, default=3000)
    parser.add_argument("--realtime-factor", type=float, default=SimConfig.realtime_factor)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import uvloop

    try:
        uvloop.run(serve(args))
    except TimeoutError:
        print("simulator did not stop within 10 s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
