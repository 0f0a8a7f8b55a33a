"""Command line: ``python -m relay serve | demo | simulator``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from relay.config import ConfigError, Settings


def _serve(args: argparse.Namespace) -> int:
    from relay.runtime import check_configuration
    from relay.server import serve

    try:
        settings = Settings.from_env()
        check_configuration(settings)  # once, before any worker starts: a bad file is not a restart loop
        raw_workers = os.environ.get("WEB_CONCURRENCY", "1") or "1"
        if not raw_workers.isdigit():
            raise ConfigError(f"WEB_CONCURRENCY must be a positive integer, got {raw_workers!r}")
        settings.check_credentials()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    workers = args.workers or int(raw_workers)
    serve(settings, workers=max(1, workers))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return asyncio.run(run_demo(dialect=args.dialect, record=args.record, seconds=args.seconds, verbose=args.verbose))


def _simulator(args: argparse.Namespace) -> int:
    from relay.sim.realtime import RealtimeSimulator

    async def main() -> None:
        sim = RealtimeSimulator()
        url = await sim.start(args.host, args.port)
        print(f"Realtime simulator listening at {url} (set OPENAI_REALTIME_URL to it)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay (settings from the environment; see README)")
    serve.add_argument("--workers", type=int, default=0, help="worker processes (default: WEB_CONCURRENCY or 1)")
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="a complete call offline: relay + Realtime simulator + simulated caller")
    demo.add_argument("--dialect", choices=("ga", "beta"), default="ga")
    demo.add_argument("--record", default="demo-call.wav", help="WAV file of what the caller heard")
    demo.add_argument("--seconds", type=float, default=12.0, help="rough length of the demo call")
    demo.add_argument("--verbose", action="store_true", help="also print the relay's own log lines")
    demo.set_defaults(func=_demo)
    sim = sub.add_parser("simulator", help="run the offline Realtime API simulator on its own")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.set_defaults(func=_simulator)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
