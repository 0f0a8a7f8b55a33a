"""The assistant's output: audio on its way to the caller, and cutting it off at a barge-in.

This part joins what `Playback` knows (what was sent and heard) with what `Responses` knows
(which response is active, which are dropped) under the speech machine of machines.py. An
audio delta of a dropped or out-of-band response never reaches Twilio; the first audio of a
response reports how long the caller waited for it (``mouth_to_ear_sent_seconds``, and
``mouth_to_ear_played_seconds`` once Twilio has played it).

The audio delta path runs 50 times a second per call: one call into `Playback.send`, and a
machine transition only when the output was not speaking already.

A call whose audio does not pass through the relay (SIP: OpenAI plays it to the caller) has no
playback accounting: ``output_audio_buffer.started/stopped/cleared`` say when the assistant is
heard, and cutting it off is ``response.cancel`` then ``output_audio_buffer.clear``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from relay.audio import audio_bytes
from relay.call.conversation import SUMMARY_PURPOSE
from relay.call.effects import Metric, Outbox
from relay.call.machines import Machine, Speech
from relay.call.playback import Playback
from relay.call.responses import Responses
from relay.realtime import client
from relay.realtime import events as ev
from relay.twilio.messages import is_base64

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


class Assistant:
    """What the assistant is saying, and the rules for cutting it off."""

    __slots__ = (
        "_clock",
        "_log",
        "_outbox",
        "dropped_deltas",
        "machine",
        "playback",
        "remote_playing",
        "responses",
        "turn_ended_at",
    )

    def __init__(
        self,
        outbox: Outbox,
        machine: Machine[Speech],
        playback: Playback,
        responses: Responses,
        clock: Callable[[], float],
        log: Logger,
    ) -> None:
        self._outbox = outbox
        self.machine = machine
        self.playback = playback
        self.responses = responses
        self._clock = clock
        self._log = log
        self.dropped_deltas = 0
        self.remote_playing = False  # OpenAI plays a response's audio itself (calls without an audio path)
        # when the caller's turn ended (or the session became ready, for the greeting): the
        # mouth-to-ear latency of the next response counts from here
        self.turn_ended_at: float | None = None

    def audio_delta(self, event: ev.AudioDelta) -> None:
        """Relay one chunk of the assistant's audio to Twilio, unless its response was dropped."""
        responses = self.responses
        response_id = event.response_id
        if response_id in responses.dropped or response_id in responses.out_of_band:
            self.dropped_deltas += 1
            return
        payload = event.delta
        if not payload or not is_base64(payload):
            self._log.warning("audio delta of %s is not base64; skipped", event.item_id)
            return
        machine = self.machine
        if machine.state is not Speech.SPEAKING and machine.state is not Speech.GREETING:
            if not machine.fire("audio"):
                return
        name = self.playback.send(payload, audio_bytes(payload), event.item_id, response_id)
        if response_id not in responses.had_audio:
            responses.had_audio.add(response_id)
            if self.turn_ended_at is not None:
                sent = Metric("mouth_to_ear_sent_seconds", self._clock() - self.turn_ended_at)
                self._outbox.effects.append(sent)
                self.playback.watch(name, self.turn_ended_at)
                self.turn_ended_at = None

    def remote_started(self, event: ev.OutputAudioStarted) -> None:
        """OpenAI began playing a response to the caller (calls without an audio path)."""
        responses = self.responses
        if event.response_id in responses.dropped or event.response_id in responses.out_of_band:
            return
        machine = self.machine
        if machine.state is not Speech.SPEAKING and machine.state is not Speech.GREETING:
            if not machine.fire("audio"):
                return
        self.remote_playing = True
        if self.turn_ended_at is not None:  # what OpenAI plays is what the caller hears
            heard = Metric("mouth_to_ear_played_seconds", self._clock() - self.turn_ended_at)
            self._outbox.effects.append(heard)
            self.turn_ended_at = None

    def remote_stopped(self) -> None:
        """OpenAI's output buffer played out or was cleared: nothing is playing now."""
        self.remote_playing = False
        self.settle()

    def greet(self) -> None:
        """The first session is ready and the greeting is asked for."""
        self.machine.fire("greet")
        self.turn_ended_at = self._clock()  # greeting latency counts from session ready

    def response_created(self, event: ev.ResponseCreated) -> None:
        """An out-of-band response (the summary) is no output of the assistant's."""
        metadata = event.metadata or {}
        out_of_band = metadata.get("purpose") == SUMMARY_PURPOSE or event.conversation == "none"
        if out_of_band or self.machine.fire("created"):
            self.responses.created(event.response_id, out_of_band=out_of_band)

    def settle(self) -> None:
        """The output is over once nothing is unplayed and no response is active."""
        state = self.machine.state
        if state is Speech.SPEAKING or state is Speech.RESPONDING or state is Speech.GREETING:
            if self.playback.unplayed_bytes == 0 and self.responses.active is None and not self.remote_playing:
                self.machine.fire("finished")

    def cut_off(self, *, cancel: bool, barge_in: bool = True) -> bool:
        """Clear Twilio, truncate each item at what was heard, drop the response's late deltas
        and, when `cancel` (the server won't), cancel it. False if nothing was playing."""
        responses = self.responses
        if not self.playback.has_pending and responses.active is None and not self.remote_playing:
            return False
        if barge_in:
            self._outbox.effects.append(Metric("barge_ins", 1.0))
        responses.dropped.update(self.playback.cut())
        responses.cut_active(cancel=cancel)
        if self.remote_playing and cancel:  # the server stops what it plays only when it cancels itself
            self._outbox.send_upstream(client.clear_output_audio())
            self.remote_playing = False
        return True

    def caller_started(self, *, cancel: bool) -> None:
        """The caller started talking: a barge-in if the assistant was speaking or generating."""
        self.turn_ended_at = None
        if self.cut_off(cancel=cancel):
            self.machine.fire("barge_in")

    def caller_stopped(self) -> None:
        self.turn_ended_at = self._clock()
        if self.machine.state is Speech.INTERRUPTED:
            self.machine.fire("caller_done")
        self.settle()
