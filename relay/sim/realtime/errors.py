"""Client mistakes and how the simulated service words them.

A refused client event is answered with an ``error`` event of type ``invalid_request_error`` and
the session stays open; ``error.event_id`` echoes the client's ``event_id``
(/work/shared/PROTOCOLS.md §8, §11). The message texts follow the service's own where they were
recorded, because relays match on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from relay.sim.realtime.wire import JSON


class Problem(Exception):
    """A client mistake answered with an ``error`` event (the session stays open)."""

    def __init__(self, code: str | None, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def require(event: JSON, name: str, kind: type | tuple[type, ...]) -> Any:
    """The value of a required field of a client event, refused when missing or of the wrong type."""
    value = event.get(name)
    if value is None:
        raise Problem("missing_required_parameter", f"Missing required parameter: '{name}'.", name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Problem("invalid_type", f"Invalid type for '{name}'.", name)
    return value


def supported(values: Iterable[Any]) -> str:
    """The API's enumeration style: 'a', 'b' and 'c'."""
    quoted = [f"'{value}'" for value in sorted(values, key=str)]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def error_event(code: str | None, message: str, param: str | None, client_event: JSON | None) -> JSON:
    """The ``error`` server event for one refusal (without its own ``event_id``)."""
    client_event_id = client_event.get("event_id") if client_event else None
    error: JSON = {
        "type": "invalid_request_error",
        "code": code,
        "message": message,
        "param": param,
        "event_id": client_event_id if isinstance(client_event_id, str) else None,
    }
    return {"type": "error", "error": error}
