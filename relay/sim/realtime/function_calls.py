"""Scripted function calls: when the simulated model calls a tool, and how the call is streamed.

Calls are armed by configuration, for a numbered caller turn (``function_calls_on_turn``) or for a
user text message containing a phrase (``function_calls_on_text``); the next response in the
conversation then carries them, each a ``function_call`` item whose arguments arrive as deltas.
The GA ``function_call_arguments.done`` names the function; the beta one does not
(/work/shared/PROTOCOLS.md §9, §10).
"""

from __future__ import annotations

import asyncio

from relay.sim.realtime.conversation import Conversation
from relay.sim.realtime.generation import Response, ResponseOutput
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.wire import JSON, new_id


class FunctionCalls:
    """Owns the calls armed for the next response and streams them when it runs."""

    def __init__(self, out: Outbox, conversation: Conversation, output: ResponseOutput) -> None:
        self.out = out
        self.rec = out.rec
        self.conversation = conversation
        self.output = output
        self.pending: list[tuple[str, str]] | None = None

    def arm_for_turn(self, turn: int) -> None:
        """A committed caller turn: arm the calls configured for its number."""
        calls = self.out.cfg.function_calls_on_turn.get(turn)
        if calls:
            self.pending = list(calls)

    def arm_for_message(self, item: JSON) -> None:
        """A conversation item the client created: a user message's text may arm configured calls."""
        if item.get("type") == "message" and item.get("role") == "user":
            texts = [
                part["text"]
                for part in item["content"]
                if isinstance(part, dict) and part.get("type") == "input_text" and isinstance(part.get("text"), str)
            ]
            for needle, calls in self.out.cfg.function_calls_on_text.items():
                if any(needle in text for text in texts):
                    self.pending = list(calls)
                    break

    def take(self) -> list[tuple[str, str]]:
        """The armed calls, disarmed: the response being started carries them."""
        calls, self.pending = self.pending or [], None
        return calls

    async def generate(self, response: Response) -> None:
        for name, arguments in response.calls:
            call_id = new_id("call")
            self.conversation.known_call_ids.add(call_id)
            item: JSON = {
                "id": new_id("item"),
                "object": "realtime.item",
                "type": "function_call",
                "status": "in_progress",
                "name": name,
                "call_id": call_id,
                "arguments": "",
            }
            self.output.open_item(response, item)
            where = {
                "response_id": response.id,
                "item_id": item["id"],
                "output_index": response.output.index(item),
            }
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                if piece:
                    self.out.emit(
                        {
                            "type": "response.function_call_arguments.delta",
                            **where,
                            "call_id": call_id,
                            "delta": piece,
                        }
                    )
                    item["arguments"] += piece
                    await asyncio.sleep(0)
            done: JSON = {
                "type": "response.function_call_arguments.done",
                **where,
                "call_id": call_id,
                "arguments": arguments,
            }
            if self.rec.dialect == "ga":
                done["name"] = name
            self.out.emit(done)
            self.output.close_item(response, "completed")
