"""The record of one simulated session: what the relay sent and what the simulator answered.

Tests and the load bench assert on it; the session's parts also keep the conversation's audio
bookkeeping here (assistant audio sent per item, truncation points, caller audio per turn), so
``audio_ms()`` reports what the service would consider heard (/work/shared/PROTOCOLS.md §11).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from relay.sim.realtime.wire import JSON, Dialect, clone, new_id


@dataclass(eq=False)
class SimSession:
    """What happened on one accepted WebSocket: the record tests and benches assert on."""

    dialect: Dialect
    headers: dict[str, str]
    path: str
    query: dict[str, str]
    id: str = field(default_factory=lambda: new_id("sess"))
    model: str = ""
    connected_at: float = field(default_factory=time.monotonic)
    received: list[tuple[float, JSON]] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)
    append_count: int = 0
    append_times: list[float] = field(default_factory=list)
    appends_while_not_ulaw: int = 0
    """Appends that arrived while the session's input format was not µ-law (relay forgot to configure it)."""
    sent: list[JSON] = field(default_factory=list)
    session: JSON = field(default_factory=dict)
    truncates: list[JSON] = field(default_factory=list)
    speech_started_at: list[float] = field(default_factory=list)
    turns: int = 0
    """Caller audio turns committed so far (VAD or manual commit)."""
    responses: list[JSON] = field(default_factory=list)
    """Final response objects, as sent in ``response.done``."""
    closed: bool = False
    _conversation: list[JSON] = field(default_factory=list, repr=False)
    _sent_audio_ms: dict[str, int] = field(default_factory=dict, repr=False)
    _truncated_ms: dict[str, int] = field(default_factory=dict, repr=False)
    _user_audio_ms: dict[str, int] = field(default_factory=dict, repr=False)

    def items(self) -> list[JSON]:
        """Conversation items in order, summarised: id, type, role, status, text/transcript, audio ms."""
        summary: list[JSON] = []
        for item in self._conversation:
            entry: JSON = {"id": item["id"], "type": item["type"], "status": item.get("status")}
            if item["type"] == "message":
                entry["role"] = item.get("role")
                texts = []
                for part in item.get("content") or []:
                    if isinstance(part, dict):
                        text = part.get("text") if part.get("text") is not None else part.get("transcript")
                        if isinstance(text, str) and text:
                            texts.append(text)
                entry["text"] = " ".join(texts)
                entry["content"] = clone(item.get("content") or [])
            for key in ("call_id", "name", "arguments", "output"):
                if key in item:
                    entry[key] = item[key]
            if item["id"] in self._sent_audio_ms:
                entry["audio_ms"] = self.audio_ms(item["id"])
            elif item["id"] in self._user_audio_ms:
                entry["audio_ms"] = self._user_audio_ms[item["id"]]
            summary.append(entry)
        return summary

    def audio_ms(self, item_id: str) -> int:
        """Assistant audio of an item as the server sees it: sent so far, or less once truncated."""
        sent = self._sent_audio_ms.get(item_id, 0)
        truncated = self._truncated_ms.get(item_id)
        return sent if truncated is None else min(sent, truncated)
