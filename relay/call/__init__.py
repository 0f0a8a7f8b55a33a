"""The call core: one phone call as a sans-I/O object (see ``core``), its effects and its phase."""

from relay.call.core import Call, Effect, Entry, Metric, Phase, RunTool, SummaryReady, UpstreamFailed, UsageReport

__all__ = ["Call", "Effect", "Entry", "Metric", "Phase", "RunTool", "SummaryReady", "UpstreamFailed", "UsageReport"]
