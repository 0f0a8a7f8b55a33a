"""Shared helpers for the call core's tests: a fake clock and a call driven to a known state."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import orjson

from relay.agent_settings import AgentSettings
from relay.call import Call
from relay.realtime import events as ev
from relay.realtime.dialect import get_dialect

STREAM = "MZ" + "0" * 32
CALL_SID = "CA" + "1" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_call(
    dialect: str = "ga", greeting: str | None = "Say hello", agent: AgentSettings | None = None, **kw: Any
) -> tuple[Call, Clock]:
    clock = Clock()
    call = Call(
        call_sid=CALL_SID,
        stream_sid=STREAM,
        dialect=get_dialect(dialect),
        agent=replace(agent or AgentSettings(), greeting=greeting),
        model="gpt-realtime",
        clock=clock,
        **kw,
    )
    call.upstream_opened()
    call.take_output()
    return call, clock


def ready(call: Call) -> list[dict[str, Any]]:
    call.upstream_event(ev.SessionUpdated({}))
    return [orjson.loads(m) for m in call.take_output()[1]]


def audio(ms: int) -> str:
    return base64.b64encode(b"\xff" * (ms * 8)).decode()


def twilio_msgs(call: Call) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in call.take_output()[0]]


def start_response(call: Call, rid: str = "resp_1", item: str = "item_a") -> None:
    call.upstream_event(ev.ResponseCreated(rid, None, None))
    call.upstream_event(ev.OutputItemAdded(rid, item, "message", {"id": item}))
