"""The conversation of one simulated session: its items, and the client events that edit them.

Items are created (``previous_item_id`` omitted, ``"root"`` or an existing id), truncated, deleted
and retrieved as the service does it, with its refusals (/work/shared/PROTOCOLS.md §8, §11); a
truncation is recorded even when refused, since that is what tests look for. The items
themselves live in the session record, where ``SimSession.items()`` summarises them.
"""

from __future__ import annotations

import time
from typing import Any

from relay.sim.realtime.errors import Problem, require
from relay.sim.realtime.outbox import Outbox
from relay.sim.realtime.wire import JSON, clone, new_id


class Conversation:
    """Owns the conversation's items and the call ids a ``function_call_output`` may answer."""

    def __init__(self, out: Outbox) -> None:
        self.out = out
        self.rec = out.rec
        self.known_call_ids: set[str] = set()
        self.assistant_audio_emitted = False
        """Set by the first assistant audio delta: from then on the voice is fixed."""

    def item_added(self, item: JSON, previous_item_id: str | None) -> None:
        kind = "conversation.item.added" if self.rec.dialect == "ga" else "conversation.item.created"
        self.out.emit({"type": kind, "previous_item_id": previous_item_id, "item": clone(item)})

    def item_done(self, item: JSON) -> None:
        if self.rec.dialect == "ga":
            self.out.emit(
                {
                    "type": "conversation.item.done",
                    "previous_item_id": self.prev_id(item),
                    "item": clone(item),
                }
            )

    def last_item_id(self) -> str | None:
        conversation = self.rec._conversation
        return str(conversation[-1]["id"]) if conversation else None

    def find(self, item_id: Any) -> JSON | None:
        for item in self.rec._conversation:
            if item["id"] == item_id:
                return item
        return None

    def prev_id(self, item: JSON) -> str | None:
        conversation = self.rec._conversation
        for index, candidate in enumerate(conversation):
            if candidate is item:
                return str(conversation[index - 1]["id"]) if index else None
        return None

    def on_item_create(self, event: JSON) -> JSON:
        """Insert the item the client sent and return it as stored."""
        item = require(event, "item", dict)
        kind = item.get("type")
        if kind not in ("message", "function_call", "function_call_output"):
            raise Problem(
                "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: 'message', 'function_call' and "
                "'function_call_output'.",
                "item.type",
            )
        item_id = item.get("id")
        if item_id is not None and (not isinstance(item_id, str) or len(item_id) > 32):
            raise Problem("invalid_value", "Invalid 'item.id': expected a string of at most 32 characters.", "item.id")
        if item_id is not None and self.find(item_id) is not None:
            raise Problem("item_id_already_exists", f"Item with id '{item_id}' already exists.", "item.id")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system"):
                raise Problem(
                    "invalid_value",
                    "Invalid 'item.role'. Supported values are: 'user', 'assistant' and 'system'.",
                    "item.role",
                )
            if not isinstance(item.get("content"), list):
                raise Problem(
                    "missing_required_parameter",
                    "Missing required parameter: 'item.content'.",
                    "item.content",
                )
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in self.known_call_ids:
                raise Problem("invalid_value", f"Tool call ID '{call_id}' not found in conversation.", "item.call_id")
            if not isinstance(item.get("output"), str):
                raise Problem("missing_required_parameter", "Missing required parameter: 'item.output'.", "item.output")
        else:
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise Problem(
                        "missing_required_parameter",
                        f"Missing required parameter: 'item.{key}'.",
                        f"item.{key}",
                    )
        conversation = self.rec._conversation
        after = event.get("previous_item_id")
        if after is None:
            position, previous = len(conversation), self.last_item_id()
        elif after == "root":
            position, previous = 0, None
        else:
            anchor = self.find(after)
            if anchor is None:
                raise Problem(
                    "invalid_value",
                    f"Previous item with id '{after}' not found in conversation.",
                    "previous_item_id",
                )
            position, previous = conversation.index(anchor) + 1, str(after)
        fields = {key: value for key, value in clone(item).items() if key not in ("id", "object", "status")}
        stored: JSON = {
            "id": item_id or new_id("item"),
            "object": "realtime.item",
            "status": "completed",
            **fields,
        }
        if kind == "function_call":
            self.known_call_ids.add(stored["call_id"])
        conversation.insert(position, stored)
        self.item_added(stored, previous)
        self.item_done(stored)
        return stored

    def on_truncate(self, event: JSON) -> None:
        item = self.find(event.get("item_id"))
        record: JSON = {
            "item_id": event.get("item_id"),
            "content_index": event.get("content_index"),
            "audio_end_ms": event.get("audio_end_ms"),
            "sent_ms": self.rec.audio_ms(item["id"]) if item is not None else 0,
            "at": time.monotonic(),
            "ok": False,
        }
        self.rec.truncates.append(record)  # malformed and refused ones too: they are what tests look for
        item_id = require(event, "item_id", str)
        content_index = require(event, "content_index", int)
        audio_end_ms = require(event, "audio_end_ms", int)
        sent_ms = int(record["sent_ms"])
        if item is None:
            raise Problem("item_not_found", f"Item with id '{item_id}' not found in conversation.", "item_id")
        if item.get("role") != "assistant" or item_id not in self.rec._sent_audio_ms:
            raise Problem("invalid_value", "Only assistant messages with audio can be truncated.", "item_id")
        if content_index != 0:
            raise Problem(
                "invalid_value",
                f"Invalid 'content_index': {content_index}; the audio is at 0.",
                "content_index",
            )
        if audio_end_ms < 0:
            raise Problem("invalid_value", "Invalid 'audio_end_ms': must not be negative.", "audio_end_ms")
        if audio_end_ms > sent_ms:
            # As recorded from the service: no code, no param, the durations without a space before "ms".
            raise Problem(None, f"Audio content of {sent_ms}ms is already shorter than {audio_end_ms}ms")
        self.rec._truncated_ms[item_id] = audio_end_ms
        for part in item.get("content") or []:
            if isinstance(part, dict) and "transcript" in part:
                part["transcript"] = ""  # the service drops the text of the unheard part; we drop it all
        record["ok"] = True
        self.out.emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": content_index,
                "audio_end_ms": audio_end_ms,
            }
        )

    def on_delete(self, event: JSON) -> None:
        item_id = require(event, "item_id", str)
        item = self.find(item_id)
        if item is None:
            raise Problem(
                "item_not_found",
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                "item_id",
            )
        self.rec._conversation.remove(item)
        self.out.emit({"type": "conversation.item.deleted", "item_id": item_id})

    def on_retrieve(self, event: JSON) -> None:
        item_id = require(event, "item_id", str)
        item = self.find(item_id)
        if item is None:
            raise Problem("item_not_found", f"Item with id '{item_id}' not found in conversation.", "item_id")
        self.out.emit({"type": "conversation.item.retrieved", "item": clone(item)})
