"""Whether a call is ending, and why: one value shared by the parts of its transport."""

from __future__ import annotations


class CallEnd:
    """None while the call goes on; then the first reason given (later ones change nothing).

    Reasons are the ``end_reason`` of the call's record and metrics: ``caller_hung_up``,
    ``caller_disconnected``, ``media_flood``, ``transferred``, ``realtime_error:<code>``, …
    """

    __slots__ = ("reason",)

    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def ending(self) -> bool:
        return self.reason is not None

    def begin(self, reason: str) -> str:
        """The call ends for `reason` unless it already ends for another; returns the reason in force."""
        if self.reason is None:
            self.reason = reason
        return self.reason
