"""Turn taking: who decides that the caller's turn is over, and who asks for the answer.

PROTOCOLS §7. With server VAD and ``create_response`` true the server answers by itself; with
``create_response`` false it commits each turn and the relay sends one ``response.create`` per
committed turn; with no turn detection the relay's own `Endpointer` finds the turns in the
caller's audio, and the relay commits the input buffer and asks for the answer.

The server cancels a response at speech start only with ``interrupt_response`` true; otherwise
the relay must. `committed_ms` is how much of this session's input audio has become turns: a
replacement session must not be sent that audio again.
"""

from __future__ import annotations

from collections import deque

from relay.agent_settings import VadSettings
from relay.endpointing import Endpointer

COMMITS_REMEMBERED = 32
"""Committed turns remembered so that each is answered once, however often it is reported."""


class TurnTaking:
    """The turn-taking rules for one call's VAD settings."""

    __slots__ = (
        "_answered",
        "answers_commits",
        "committed_ms",
        "endpointer",
        "server_cancels_on_speech",
        "turn_unsent",
    )

    def __init__(self, vad: VadSettings) -> None:
        # relay-side endpointing when the session has no turn detection; the transport feeds it caller audio
        self.endpointer: Endpointer | None = Endpointer(vad) if vad.type == "none" else None
        # server VAD that commits turns but leaves the answer to us (create_response false)
        self.answers_commits = vad.type != "none" and not vad.create_response
        self.server_cancels_on_speech = vad.type != "none" and vad.interrupt_response
        self._answered: deque[str] = deque(maxlen=COMMITS_REMEMBERED)
        self.turn_unsent = False  # a relay-side turn ended while no session was ready to take the commit
        self.committed_ms = 0

    def session_opened(self) -> None:
        self.committed_ms = 0
        if self.endpointer is not None:
            self.endpointer.new_session()

    def speech_stopped(self, audio_end_ms: int) -> None:
        self.committed_ms = max(self.committed_ms, audio_end_ms)

    def answer_commit(self, item_id: str) -> bool:
        """input_audio_buffer.committed: True if the relay must ask for this turn's answer (once)."""
        if not self.answers_commits or item_id in self._answered:
            return False
        self._answered.append(item_id)
        return True

    def commit_relay_turn(self, *, session_ready: bool) -> bool:
        """A relay-side turn ended: True if it is to be committed and answered now; without a
        ready session it waits, to be committed once the next one (with the replayed audio) is."""
        assert self.endpointer is not None
        if not session_ready:
            self.turn_unsent = True
            return False
        self.turn_unsent = False
        self.endpointer.committed()
        self.committed_ms = max(self.committed_ms, self.endpointer.position_ms)
        return True
