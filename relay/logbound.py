"""Bounds on what a peer can make the relay log: how often (`RepeatLimiter`) and how much (`clip`).

A caller's socket can send the same bad frame thousands of times a second. Each kind of repeated
problem on one call is logged the first few times in full, then only at 10, 100, 1000, … as a
running count: a flood of a million frames costs a handful of lines, and the count still shows
how bad it was. The totals per kind go into the "call ended" line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]

LOGGED_EACH = 5
"""The first occurrences of a kind logged one by one; after that, only counts that are powers of ten."""
CLIP_CHARS = 80
"""Peer-supplied text (SIDs, mark names, URLs, reasons) is cut to this many characters in a log line."""


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """`text` made safe for one log line: control characters escaped, cut to `limit` characters."""
    value = str(text)
    if value.isprintable() and len(value) <= limit:
        return value
    escaped = value[: limit * 4].encode("unicode_escape").decode("ascii")
    if len(escaped) > limit or len(value) > limit * 4:
        return f"{escaped[:limit]}…({len(value)} chars)"
    return escaped


def lines_for(occurrences: int) -> int:
    """How many lines `occurrences` of one kind produce under `RepeatLimiter`'s policy."""
    return sum(1 for n in range(1, occurrences + 1) if _logs_at(n))


def _logs_at(count: int) -> bool:
    if count <= LOGGED_EACH:
        return True
    while count % 10 == 0:
        count //= 10
    return count == 1


class RepeatLimiter:
    """Logs repeated messages of one kind the first few times, then as a running count.

    ``limiter.log("binary_frame", logging.WARNING, "binary frame ignored")`` logs the message for
    occurrences 1 to `LOGGED_EACH` of that kind, then only for occurrences 10, 100, 1000, … with
    " (N so far on this call)" appended (`scope` names what is counted over). Every occurrence is
    counted in `counts`, whatever the level, so a kind logged at DEBUG is bounded the same way when
    DEBUG is on.
    """

    __slots__ = ("counts", "logger", "scope")

    def __init__(self, logger: Logger, scope: str = "on this call") -> None:
        self.logger = logger
        self.scope = scope
        self.counts: dict[str, int] = {}

    def log(
        self,
        kind: str,
        level: int,
        msg: str,
        *args: Any,
        extra: Mapping[str, object] | None = None,
        exc_info: bool = False,
    ) -> int:
        """Count one occurrence of `kind` and log it if the policy says so; returns the count.
        ``exc_info``: the first line of this kind carries the exception being handled."""
        count = self.counts.get(kind, 0) + 1
        self.counts[kind] = count
        if _logs_at(count):
            if count > LOGGED_EACH:
                msg += f" (%d so far {self.scope})"
                args = (*args, count)
            # the line names the caller, not this module
            self.logger.log(level, msg, *args, stacklevel=2, extra=extra, exc_info=exc_info and count == 1)
        return count
