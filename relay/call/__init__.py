"""The call core: one phone call as a sans-I/O object, its effects and its derived phase.

``Call`` (core.py) is the facade the I/O layer drives; its parts are playback.py, responses.py,
tool_batches.py, conversation.py and keypad.py, its state the machines of machines.py.
"""

from relay.call.core import Call
from relay.call.effects import Effect, Entry, Metric, RunTool, SummaryReady, UpstreamFailed, UsageReport
from relay.call.machines import Phase

__all__ = ["Call", "Effect", "Entry", "Metric", "Phase", "RunTool", "SummaryReady", "UpstreamFailed", "UsageReport"]
