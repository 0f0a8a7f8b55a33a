"""A simulated Twilio caller: one inbound phone call, exactly as Twilio presents it to the relay.

It posts the signed voice webhook, follows the ``<Connect><Stream>`` TwiML, and then plays
both ends of the Media Stream in real time: a microphone that streams one µ-law frame every
20 ms (speech queued with ``say()``, silence otherwise) and a phone speaker that plays the
relay's audio at 8 bytes per ms and acknowledges marks only once the audio before them has
played (or was discarded by ``clear``). Both clocks run on absolute deadlines, so the
timings the relay sees — and the barge-in and latency numbers measured here — hold under load.
/work/shared/PROTOCOLS.md §1–§4 govern it.

Parts, one concept each: ``call`` (one stream of the call and its lifecycle), ``twilio`` (the
call across its streams: the TwiML after ``</Connect>`` run as Twilio runs it, behind a balancer),
``config``, ``webhook`` (webhook and TwiML), ``stream`` (the Media Stream messages), ``microphone``,
``speaker`` (playback and mark accounting), ``clock`` (the 20 ms deadlines) and ``record`` (the
timeline and the utterances).
Used by ``python -m relay demo``, the test-suite and the load benchmark.
"""

from relay.sim.caller.call import CallClosed, SimulatedCaller
from relay.sim.caller.config import CallerConfig
from relay.sim.caller.twilio import TWILIO_RECONNECT_S, Balancer, NoInstance, TwilioCall
from relay.sim.caller.webhook import CallRejected, TwimlStream

__all__ = [
    "TWILIO_RECONNECT_S",
    "Balancer",
    "CallClosed",
    "CallRejected",
    "CallerConfig",
    "NoInstance",
    "SimulatedCaller",
    "TwilioCall",
    "TwimlStream",
]
