"""What every part of the simulated session shares about the wire: ids, JSON copies, dialect names.

The two dialects differ in the names of the assistant output events and content parts
(/work/shared/PROTOCOLS.md §10); everything else here is common to both.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import orjson

JSON = dict[str, Any]
Dialect = Literal["ga", "beta"]

_RUN_TAG = secrets.token_hex(3)
_ID_COUNTER = itertools.count(1)


def new_id(prefix: str) -> str:
    """Unique within the process; shaped like the service's ids (``item_…``, ``event_…``) and < 32 chars."""
    return f"{prefix}_{_RUN_TAG}{next(_ID_COUNTER):010d}"


def clone(value: Any) -> Any:
    """Deep copy of JSON data, so events already emitted never change when state does."""
    return orjson.loads(orjson.dumps(value))


def split_words(text: str) -> list[str]:
    """Split for deltas, keeping the separating spaces so the deltas concatenate to the text."""
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]] if text else []


@dataclass(frozen=True)
class EventNames:
    """Server event names and content types that differ between the dialects."""

    audio_delta: str
    audio_done: str
    transcript_delta: str
    transcript_done: str
    text_delta: str
    text_done: str
    audio_content: str
    text_content: str


NAMES: dict[Dialect, EventNames] = {
    "ga": EventNames(
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.delta",
        "response.output_audio_transcript.done",
        "response.output_text.delta",
        "response.output_text.done",
        "output_audio",
        "output_text",
    ),
    "beta": EventNames(
        "response.audio.delta",
        "response.audio.done",
        "response.audio_transcript.delta",
        "response.audio_transcript.done",
        "response.text.delta",
        "response.text.done",
        "audio",
        "text",
    ),
}
