"""An example domain tool over a small bundled data set: copy this module to write your own.

Writing a tool
--------------
A tool is an ``async def`` decorated with ``@tool`` whose first parameter is the
``ToolContext``; every other parameter is an argument the model fills in::

    from typing import Annotated, Literal
    from relay.tools import ToolContext, ToolFailure, tool

    @tool(description="Book an appointment slot for the caller.", timeout_s=5.0)
    async def book_slot(
        ctx: ToolContext,
        day: Annotated[str, "Day of the appointment, YYYY-MM-DD"],
        period: Literal["morning", "afternoon"] = "morning",
        notes: str | None = None,
    ) -> dict[str, str]:
        ...
        return {"booked": day, "period": period}

- **Description.** ``description=`` or the function's docstring; the model reads it to decide
  when to call the tool, so say what it does and when to use it.
- **Schema.** Type hints become the JSON Schema the model sees: ``str``, ``int``, ``float``,
  ``bool``, ``dict``, ``list[X]``, ``Literal[...]`` (an enum), ``X | None`` (nullable) and
  ``Annotated[X, "description"]``. A parameter without a default is required; unknown
  arguments are refused. For anything else pass ``@tool(parameters={...JSON Schema object...})``.
- **Validation.** Arguments are checked before the function runs. Wrong type, missing or extra
  arguments, or a value outside an enum never reach your code: the model receives
  ``{"error": {"type": "invalid_arguments", "message": "..."}}`` and can ask the caller again.
- **Results.** Return anything JSON-serializable (or a string); it becomes the
  ``function_call_output``. Raise ``ToolFailure("message")`` for an error the model should
  explain to the caller (``"type": "tool_error"``). Any other exception is logged with its stack
  trace and the model only hears that the tool failed. A tool that runs longer than its
  ``timeout_s`` (default ``RELAY_TOOL_TIMEOUT``, 10 s) is cancelled (``"type": "timeout"``).
- **Never blocking audio.** Tools run as tasks beside the call; caller audio keeps flowing.
  Use async I/O, or ``await asyncio.to_thread(...)`` for blocking libraries.
- **Context.** ``ctx.call_sid``, ``ctx.caller`` and ``ctx.called`` (E.164 numbers),
  ``ctx.profile`` (the agent profile of the called number), ``ctx.store`` (the state store,
  ``relay.store.Store``: e.g. ``add_entry``, ``get_caller_memory``; it may be slow or down),
  ``ctx.log`` (a logger tagged with the call), ``await ctx.end_call(reason)``,
  ``await ctx.transfer_call(number, whisper_text)`` (the relay keeps whole sentences of the
  text up to 300 characters and drops any that repeat the caller's memory) and ``ctx.summary()``
  (the conversation summary so far, or None).
- **Loading.** List the module in ``RELAY_HANDLERS`` (comma-separated import paths, e.g.
  ``handlers.call_control,handlers.orders,mycompany.tools``); it only has to be importable.
  Tool names must be unique across modules. A profile's ``tools = [...]`` limits which tools
  the model is offered on that number (see ``relay/profiles.py``).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Annotated, Any

from relay.tools import ToolContext, ToolFailure, tool


@cache
def _orders() -> dict[str, dict[str, Any]]:
    data = json.loads(resources.files("handlers").joinpath("data/orders.json").read_text(encoding="utf-8"))
    return {order["order_id"]: order for order in data}


@tool(description="Look up an order by its number and tell the caller its status and delivery date.")
async def lookup_order(
    ctx: ToolContext,
    order_id: Annotated[str, "The order number the caller gives, digits only, e.g. 10042"],
    include_items: Annotated[bool, "Also list the items in the order"] = False,
) -> dict[str, Any]:
    order = _orders().get(order_id.strip().lstrip("#"))
    if order is None:
        raise ToolFailure(f"there is no order number {order_id}; ask the caller to check the number")
    answer = {k: v for k, v in order.items() if k != "items"}
    if include_items:
        answer["items"] = order["items"]
    return answer
