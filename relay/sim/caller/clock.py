"""The caller's clock: a phone line runs on absolute 20 ms deadlines, whatever the event loop does.

Both the microphone and the speaker tick on it, so the timings the relay sees, and the barge-in
and latency numbers measured at the caller, hold under load (/work/shared/PROTOCOLS.md §3).
"""

from __future__ import annotations

import asyncio
import time

MAX_BURST_FRAMES = 3
"""After a stall, at most this many frames go out back-to-back; older debt is forgiven
(the clock is re-anchored) instead of flooding the relay with a burst."""


class Pacer:
    """Ticks due at ``epoch + n * period``: sleep overshoot is never added up into drift."""

    def __init__(self, epoch: float, period_s: float) -> None:
        self.epoch = epoch
        self.period_s = period_s
        self.ticks = 0

    async def next_tick(self) -> int:
        """Wait for the next tick; return how many ticks were forgiven after a long stall."""
        self.ticks += 1
        due = self.epoch + self.ticks * self.period_s
        now = time.monotonic()
        if now < due:
            await asyncio.sleep(due - now)
            return 0
        lag = now - due
        if lag < MAX_BURST_FRAMES * self.period_s:
            await asyncio.sleep(0)
            return 0
        # Keep just enough debt for a short burst; the grid moves, its spacing does not.
        shift = lag - (MAX_BURST_FRAMES - 1) * self.period_s
        self.epoch += shift
        return int(shift / self.period_s)
