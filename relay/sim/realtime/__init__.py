"""Offline OpenAI Realtime server: the relay's upstream peer for the demo, the tests and the load bench.

It speaks both wire dialects (GA and ``OpenAI-Beta: realtime=v1``) closely enough that the relay cannot
tell it from the real service for the paths it uses: session configuration, an energy VAD over the
µ-law it receives, synthetic spoken replies paced like real generation, barge-in (server-side cancel,
truncate bookkeeping and its errors), function calls, out-of-band responses and the fatal errors of a
bad key or an expired session. It is as strict as the service where a relay could go wrong: a
``session.update`` naming a field the dialect does not declare, at any depth, or an audio format it does
not name is refused; ``session.created`` reports the service's own defaults; a cancelled response still
delivers the audio deltas already in flight. Every event it emits validates against the ``openai``
package's server event types, and its session field tables equal that package's (both checked in the
tests; this package never imports ``openai``). /work/shared/PROTOCOLS.md §6–§11 and §16 govern it.

Parts, one concept each: ``server`` (listening, dialect, the test handle), ``peer`` (one connection:
its faults and the dispatch of client events), ``session`` and ``schema`` (session configuration and
its validation), ``input_audio`` (the input buffer and turn detection), ``conversation`` (items and
truncation), ``responses`` and ``generation`` (response lifecycle, streamed audio and text),
``function_calls``, ``errors``, ``outbox`` (the ordered way out), ``record`` and ``config`` (what tests
read and set). ``python -m relay.sim.realtime`` serves one on a fixed port.
"""

from relay.sim.realtime.config import LatencyProbe, SimConfig
from relay.sim.realtime.record import SimSession
from relay.sim.realtime.server import RealtimeSimulator, serve_forever

__all__ = [
    "LatencyProbe",
    "RealtimeSimulator",
    "SimConfig",
    "SimSession",
    "serve_forever",
]
