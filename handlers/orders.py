"""An example domain tool over a small bundled data set: copy this to write your own.

A tool is an ``async def`` taking a ToolContext and typed parameters; the type hints become
the JSON Schema the model sees, and arguments are validated before the function runs.
Return anything JSON-serializable; raise ToolFailure for an error the model should explain.
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
