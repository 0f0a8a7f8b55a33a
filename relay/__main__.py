"""Command line: ``python -m relay serve | demo | simulator``."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys

from relay import logs
from relay.config import Settings
from relay.env import SECRET_ENV, ConfigError


def _workers(flag: int) -> int:
    """Worker processes: ``--workers`` (0: not given), else WEB_CONCURRENCY, else 1."""
    if flag < 0:
        raise ConfigError(f"--workers must be 0 (use WEB_CONCURRENCY) or a positive integer, got {flag}")
    raw = os.environ.get("WEB_CONCURRENCY", "") or "1"
    if not re.fullmatch(r"[0-9]{1,4}", raw) or int(raw) < 1:
        raise ConfigError(f"WEB_CONCURRENCY must be a positive integer, got {raw[:32]!r}")
    return flag or int(raw)


def _serve(args: argparse.Namespace) -> int:
    # JSON lines from the very first one: warnings raised while the configuration is checked
    # (handler modules, profiles, the store) go through the same handler as the workers' lines.
    logs.configure(logs.level_from(os.environ.get("LOG_LEVEL")), [os.environ.get(name) for name in SECRET_ENV])
    try:
        settings = Settings.from_env()
        workers = _workers(args.workers)
        from relay.metrics import reset_multiprocess_dir  # the server's modules only once the settings are sound
        from relay.runtime import check_configuration

        check_configuration(settings)  # once, before any worker starts: a bad file is not a restart loop
        reset_multiprocess_dir()
        settings.check_credentials()
    except ConfigError as exc:
        print(f"configuration error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    from relay.server import serve

    serve(settings, workers=workers)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.sip:
        from relay.demo_sip import run_sip_demo

        return asyncio.run(run_sip_demo(verbose=args.verbose))
    if args.console:
        from relay.demo_console import run_console_demo

        try:
            return asyncio.run(run_console_demo(verbose=args.verbose))
        except KeyboardInterrupt:  # Ctrl-C is how it ends
            return 0
    if args.failover:
        from relay.demo_failover import run_failover_demo

        return asyncio.run(run_failover_demo(verbose=args.verbose))
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
    demo.add_argument(
        "--failover",
        action="store_true",
        help="two relay processes sharing Redis: the one carrying the call is killed mid-sentence, the other "
        "carries on (Redis from REDIS_URL, else a private redis-server)",
    )
    demo.add_argument("--sip", action="store_true", help="one call in SIP mode, against a simulated SIP connector")
    demo.add_argument(
        "--console",
        action="store_true",
        help="the operations console on a relay with a few simulated calls; prints its URL and a sign-in token",
    )
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
