"""Built-in call control: hang up politely, transfer to a human. Both go through Twilio's REST API.

- ``end_call`` waits until Twilio has acknowledged the marks of everything the caller was sent
  (the goodbye has played; at most ``RELAY_END_CALL_TIMEOUT`` seconds), then completes the call
  (``Status=completed``) and closes the Realtime session.
- ``transfer_call`` dials a destination named in the call's profile (``transfer_numbers``); a
  number the model makes up is refused unless the profile sets ``allow_any_transfer_number``.
  With ``whisper_summary`` the human hears a short summary before being connected.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from relay.agent_settings import AgentSettings
from relay.tools import ToolContext, ToolFailure, tool

_E164 = re.compile(r"\+[1-9][0-9]{7,14}")


@tool(
    description=(
        "End the phone call. Always say a short goodbye to the caller first; the line is hung up "
        "once your goodbye has finished playing."
    ),
    timeout_s=60.0,
)
async def end_call(
    ctx: ToolContext, reason: Annotated[str, "Why the call is ending, for the call record"] = "conversation finished"
) -> dict[str, Any]:
    ctx.log.info("assistant ends the call: %s", reason[:200])
    await ctx.end_call("assistant_ended")
    return {"ok": True}


def _transfer_destinations(tool: dict[str, Any], profile: AgentSettings) -> dict[str, Any]:
    """Show the model the destinations of this call's profile (and only those, unless any number is allowed)."""
    names = sorted(profile.transfer_numbers)
    destination = tool["parameters"]["properties"]["destination"]
    if names and not profile.allow_any_transfer_number:
        destination["enum"] = names
    listed = ", ".join(names) if names else "none configured"
    tool["description"] += f" Available destinations: {listed}."
    if profile.allow_any_transfer_number:
        tool["description"] += " A phone number in E.164 form (+15551234567) is also accepted."
    return tool


@tool(
    description=(
        "Transfer the caller to a human colleague. 'destination' is the name of a configured "
        "destination (for example 'sales' or 'billing'). Tell the caller you are transferring them first."
    ),
    timeout_s=60.0,
    adapt=_transfer_destinations,
)
async def transfer_call(
    ctx: ToolContext,
    destination: Annotated[str, "Name of the destination to transfer to"],
    reason: Annotated[str, "Short reason for the transfer, for the human colleague"] = "",
) -> dict[str, Any]:
    numbers = ctx.profile.transfer_numbers
    wanted = destination.strip()
    if wanted in numbers:
        number = numbers[wanted]
    elif wanted in numbers.values():  # the model used a configured number instead of its name
        number = wanted
    elif ctx.profile.allow_any_transfer_number and _E164.fullmatch(wanted):
        number = wanted
    else:
        available = ", ".join(sorted(numbers)) or "none"
        raise ToolFailure(f"unknown destination {destination!r}; available destinations: {available}")
    whisper = None
    if ctx.profile.whisper_summary:
        summary = ctx.summary()
        why = reason.strip().rstrip(".")
        whisper = "Incoming transfer. " + (f"{why}. " if why else "") + (summary or "")
    ctx.log.info("transferring the call to %s", wanted)
    await ctx.transfer_call(number, whisper.strip() if whisper else None)
    return {"ok": True, "transferred_to": wanted}
