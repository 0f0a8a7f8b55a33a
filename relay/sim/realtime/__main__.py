"""``python -m relay.sim.realtime``: serve a simulator on a fixed port for manual runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import relay.sim.realtime as package
from relay.sim.realtime.config import SimConfig
from relay.sim.realtime.server import serve_forever


def main(argv: list[str] | None = None) -> None:
    """Command line entry: serve a simulator on a fixed port for manual runs."""
    description = (package.__doc__ or "").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m relay.sim.realtime", description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--reply-ms", type=int, default=SimConfig.reply_ms)
    parser.add_argument("--realtime-factor", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = SimConfig(reply_ms=args.reply_ms, realtime_factor=args.realtime_factor)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(args.host, args.port, config))


if __name__ == "__main__":
    main()
