"""Built-in call control: hang up politely, transfer to a human. Both go through Twilio's REST API."""

from __future__ import annotations

import re
from typing import Annotated, Any

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


@tool(
    description=(
        "Transfer the caller to a human colleague. 'destination' is the name of a configured "
        "destination (for example 'sales' or 'billing'). Tell the caller you are transferring them first."
    ),
    timeout_s=60.0,
)
async def transfer_call(
    ctx: ToolContext,
    destination: Annotated[str, "Name of the destination to transfer to"],
    reason: Annotated[str, "Short reason for the transfer, for the human colleague"] = "",
) -> dict[str, Any]:
    numbers = ctx.profile.transfer_numbers
    if destination in numbers:
        number = numbers[destination]
    elif ctx.profile.allow_any_transfer_number and _E164.fullmatch(destination):
        number = destination
    else:
        available = ", ".join(sorted(numbers)) or "none"
        raise ToolFailure(f"unknown destination {destination!r}; available destinations: {available}")
    whisper = None
    if ctx.profile.whisper_summary:
        summary = ctx.summary()
        whisper = "Incoming transfer. " + (reason + ". " if reason else "") + (summary or "")
    ctx.log.info("transferring the call to %s", destination)
    await ctx.transfer_call(number, whisper)
    return {"ok": True, "transferred_to": destination}
