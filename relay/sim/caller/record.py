"""What a simulated call keeps for the test that placed it: a timeline of events and the caller's speech.

Every event is stamped on the monotonic clock as it happens, so tests can order the caller's
speech, the relay's audio and marks, and measure mouth-to-ear latency from the utterances.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

Event = tuple[float, str, dict[str, Any]]


class CallLog:
    """The call's timeline, and the protocol errors the relay made on it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.errors: list[str] = []

    def record(self, kind: str, **details: Any) -> None:
        self.events.append((time.monotonic(), kind, details))

    def error(self, text: str) -> None:
        self.errors.append(text)
        self.record("error", message=text)


@dataclass
class Utterance:
    """One piece of caller speech queued with ``say()``: when it went out, and when its answer was heard."""

    audio: bytes
    index: int
    offset: int = 0
    sent_start: float | None = None
    sent_end: float | None = None
    # Position in the relay's audio stream when the utterance ended: only audio past this
    # point can be the answer to it.
    answer_from: int = 0
    first_heard: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
