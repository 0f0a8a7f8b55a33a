"""The simulator's behaviour knobs and the load bench's measuring hook.

Everything a test may want to vary about the simulated service lives in ``SimConfig``: reply
length and pacing, VAD sensitivity, scripted function calls, faults (a refused key, a fatal
error on connect, a maximum session length) and the late audio deltas of a cancelled response
(/work/shared/PROTOCOLS.md §11).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from relay.sim.realtime.record import SimSession


@dataclass
class SimConfig:
    """Behaviour knobs; read at use time, so tests may change them between calls."""

    reply_ms: int = 1500
    greeting_reply_ms: int | None = None
    chunk_ms: tuple[int, ...] = (40, 100, 60, 120, 80)
    realtime_factor: float = 4.0
    response_delay_ms: int = 120
    vad_rms_threshold: float = 500.0
    vad_min_speech_ms: int = 60
    function_calls_on_turn: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    function_calls_on_text: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    answer_session_update: bool = True
    fatal_error_on_connect: str | None = None
    max_session_s: float | None = None
    expected_api_key: str | None = None
    record_audio: bool = True
    speech_before_calls_ms: int = 0
    """Off by default. A response carrying function calls first speaks this much audio (a goodbye before end_call)."""
    late_audio_deltas: int = 2
    """Audio deltas of a cancelled response that still arrive after the cancel (barge-in or client), as live
    sessions show: a relay must drop them. 0 turns it off."""
    latency_probe: LatencyProbe | None = None
    """Off by default. The load bench's hook: sees every decoded append, may stamp every audio chunk sent."""


class LatencyProbe(Protocol):
    """Measures transit outside the relay: markers the caller hid in its audio, markers added to replies."""

    def appended(self, session: SimSession, audio: bytes) -> None:
        """Called with the decoded bytes of every valid ``input_audio_buffer.append``, on arrival."""

    def outgoing(self, session: SimSession, chunk: bytes) -> bytes:
        """Called for every assistant audio chunk right before it is queued; returns the bytes to send."""
