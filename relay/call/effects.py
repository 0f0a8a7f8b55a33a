"""What the call hands back to the I/O layer: messages to send and effects to perform.

Every part of the call writes into one `Outbox`, the way python-websockets' protocol fills
``data_to_send()``: the I/O layer takes everything at once with ``Call.take_output()`` and
performs it. Effects are frozen values, so a test compares them with ``==``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Entry:
    """A conversation entry for the store (caller/assistant transcript, dtmf, tool, interruption…)."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UsageReport:
    response_id: str
    usage: dict[str, int]


@dataclass(frozen=True, slots=True)
class RunTool:
    response_id: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class SummaryReady:
    text: str
    final: bool


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    value: float = 1.0
    label: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The Realtime API reported an error the call cannot continue past."""

    code: str
    message: str
    fatal: bool


Effect = Entry | UsageReport | RunTool | SummaryReady | Metric | UpstreamFailed


class Outbox:
    """Messages for Twilio and the Realtime API, and effects, produced since the last `take`."""

    __slots__ = ("effects", "to_twilio", "to_upstream")

    def __init__(self) -> None:
        self.to_twilio: list[str] = []
        self.to_upstream: list[str] = []
        self.effects: list[Effect] = []

    def send_upstream(self, event: Mapping[str, Any]) -> None:
        self.to_upstream.append(orjson.dumps(event).decode())

    def take(self) -> tuple[list[str], list[str], list[Effect]]:
        out = (self.to_twilio, self.to_upstream, self.effects)
        self.to_twilio, self.to_upstream, self.effects = [], [], []
        return out
