"""Offline OpenAI SIP connector: the other side of the relay's SIP mode, for the demo and the tests.

`SipSimulator` is the Realtime simulator (relay/sim/realtime) plus what OpenAI's SIP connector
adds (/work/shared/PROTOCOLS.md §14, §15):

- it offers calls: a ``realtime.call.incoming`` webhook signed the Standard Webhooks way, with
  the SIP headers a trunk sends (From, To, Call-ID, optional X- headers), and delivers it again
  with the same ``webhook-id`` when asked;
- it serves ``POST /v1/realtime/calls/{call_id}/accept|reject|refer|hangup`` (bearer auth),
  recording every request, answering 404 for a call it does not know or that is over;
- it serves the sideband (``/v1/realtime?call_id=…``) of an accepted call with the simulator's
  own session machinery, configured by the accept: the caller's speech goes through its VAD,
  transcription and responses as audio appended by a Media Stream would, scripted function calls
  fire on the configured caller turn, keys arrive as ``input_audio_buffer.dtmf_event_received``,
  and instead of audio deltas (the audio goes to the caller over RTP) the sideband sees
  ``output_audio_buffer.started`` / ``.stopped`` (once played, paced like the replies) / ``.cleared``.
"""

from relay.sim.sip.server import SimCall, SipSimulator, sign_webhook

__all__ = ["SimCall", "SipSimulator", "sign_webhook"]
