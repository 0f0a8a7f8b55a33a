"""Function calls grouped by the response that made them: one continuation per response.

A response may ask for several function calls. Each call's output goes to the model as it
arrives (``conversation.item.create`` of type ``function_call_output``); the model is asked to
continue (one ``response.create``) only once the response is done and every call it made is
answered, so it sees all the results at once and speaks once.

A call may be announced twice (``response.function_call_arguments.done`` and again in
``response.done``); it runs once. Beta's ``arguments.done`` carries no name: the name is taken
from ``response.output_item.added`` for the same item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.call.effects import Entry, Outbox, RunTool
from relay.call.machines import Machine, Tools
from relay.logbound import clip
from relay.realtime import client

TOOL_OUTPUT_CHARS_RECORDED = 4000
"""A tool's output is recorded in the call's entries up to this many characters."""


@dataclass(slots=True)
class ToolBatch:
    """Function calls of one response; one response.create once every call is answered."""

    pending: set[str] = field(default_factory=set)
    response_done: bool = False
    answered: int = 0


class ToolBatches:
    """Every batch of the call, which response each function call belongs to, and the tools machine."""

    __slots__ = ("_batches", "_call_response", "_function_names", "_outbox", "_started", "machine")

    def __init__(self, outbox: Outbox, machine: Machine[Tools]) -> None:
        self._outbox = outbox
        self.machine = machine
        self._batches: dict[str, ToolBatch] = {}
        self._call_response: dict[str, str] = {}
        self._started: set[str] = set()
        self._function_names: dict[str, str] = {}  # item id -> name (beta's arguments.done has no name)

    @property
    def running(self) -> bool:
        """Some function call waits for its result."""
        return any(batch.pending for batch in self._batches.values())

    def note_name(self, item_id: str, name: str) -> None:
        """response.output_item.added of a function call: remember its name."""
        self._function_names[item_id] = name

    def name_for(self, item_id: str, announced: str) -> str:
        """The function's name for ``arguments.done`` of `item_id` ("" if unknown so far)."""
        return self._function_names.pop(item_id, "") or announced

    def start(self, response_id: str, call_id: str, name: str, arguments: str) -> None:
        """Run `call_id` of `response_id` (once, however often it is announced) and wait for its result."""
        if call_id in self._started or not self.machine.fire("start"):
            return
        self._started.add(call_id)
        self._batches.setdefault(response_id, ToolBatch()).pending.add(call_id)
        self._call_response[call_id] = response_id
        effects = self._outbox.effects
        effects.append(Entry("tool_call", {"call_id": call_id, "name": name, "arguments": arguments}))
        effects.append(RunTool(response_id, call_id, name, arguments))

    def result(self, call_id: str, output: str, *, ok: bool, session_ready: bool) -> str | None:
        """A handler's result: recorded and given to the model. Returns the response that made the
        call, or None when nobody waits for it (answered before, its session lost, never started)."""
        if call_id not in self._call_response:
            self.machine.refuse("result", f"call {clip(call_id)} was never started")
            return None
        if not self.awaited(call_id) or not self.machine.fire("result"):
            return None
        response_id = self._call_response[call_id]
        batch = self._batches[response_id]
        batch.pending.discard(call_id)
        batch.answered += 1
        self._outbox.effects.append(
            Entry("tool_result", {"call_id": call_id, "output": output[:TOOL_OUTPUT_CHARS_RECORDED], "ok": ok})
        )
        if session_ready:
            self._outbox.send_upstream(client.function_output(call_id, output))
        if not self.running:
            self.machine.fire("answered")
        return response_id

    def awaited(self, call_id: str) -> bool:
        """Somebody still waits for `call_id`'s result (not answered, its session not lost)."""
        response_id = self._call_response.get(call_id)
        batch = self._batches.get(response_id) if response_id is not None else None
        return batch is not None and call_id in batch.pending

    def response_done(self, response_id: str, *, made_calls: bool) -> None:
        """response.done of `response_id`; a batch is made for it if it made calls."""
        batch = self._batches.setdefault(response_id, ToolBatch()) if made_calls else self._batches.get(response_id)
        if batch is not None:
            batch.response_done = True

    def take_complete(self, response_id: str) -> bool:
        """True (once) when `response_id` is done and every call it made is answered."""
        batch = self._batches.get(response_id)
        if batch is None or batch.pending or not batch.response_done or batch.answered == 0:
            return False
        del self._batches[response_id]
        return True

    def abandon(self) -> None:
        """The session that made the calls is gone: their results are no longer awaited."""
        for batch in self._batches.values():
            batch.pending.clear()
        if self.machine.state is Tools.RUNNING:
            self.machine.fire("lost")
