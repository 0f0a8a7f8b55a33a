"""The live operations console at ``/console``: server-rendered pages (Jinja2), a little plain
JavaScript, no build step and nothing fetched from elsewhere.

It is off (every path 404) unless RELAY_CONSOLE_TOKEN is set. Signing in with that token sets a
session cookie (relay/console/auth.py); every page and the event stream need it, every action its
CSRF token too. Any instance serves any call: live calls come from the ownership registry, call
events from the store's feed (Redis pub/sub; the in-process store has its own), ended calls from
the store's index of them, and an operator's step (hang up, transfer, an instruction) goes to the
instance holding the call with `Runtime.tell_call`, written to the call's record and the log with
who and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from relay.agent_settings import AgentSettings
from relay.console.auth import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SIGNIN_MAX_FAILURES,
    SIGNIN_WINDOW_S,
    Session,
    Sessions,
)
from relay.console.timeline import timeline
from relay.runtime import Runtime
from relay.store.base import CallRecord, StoreUnavailable

log = logging.getLogger("relay.console")

HISTORY_PAGE = 20  # ended calls per page
HISTORY_SCAN = 2000  # the latest ended calls in the date range a search looks through
EVENT_KEEPALIVE_S = 15.0
EVENT_DRAIN_CHECK_S = 0.5
MAX_FORM_BYTES = 8 * 1024
SID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# What the event stream passes on of an event: never the caller's number
PRIVATE_FIELDS = frozenset({"from", "to", "caller", "called"})

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def mask_number(number: str) -> str:
    """A phone number with all but its country prefix and last four digits hidden."""
    if len(number) <= 6:
        return "•" * len(number)
    head = 2 if number.startswith("+") else 0
    return number[:head] + "•" * (len(number) - head - 4) + number[-4:]


def _epoch(iso: str) -> float | None:
    try:
        value = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return value.timestamp() if value.tzinfo is not None else None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _valid_sid(call_sid: str) -> bool:
    return 2 <= len(call_sid) <= 64 and set(call_sid) <= SID_CHARS


class Console:
    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        assert settings.console_token
        self.runtime = runtime
        self.sessions = Sessions(settings.console_token, settings.console_session_s)
        self.secure_cookie = (settings.public_url or "").startswith("https://")

    # ---- rendering ----------------------------------------------------------------------------

    def page(self, name: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> HTMLResponse:
        html = _templates.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status, headers={**_NO_STORE, **(headers or {})})

    def session(self, request: Request) -> Session | None:
        return self.sessions.verify(request.cookies.get(COOKIE))

    # ---- data ---------------------------------------------------------------------------------

    async def live_rows(self) -> list[dict[str, Any]] | None:
        live = await self.runtime.ownership.live_calls()
        if live is None:
            return None
        records = await asyncio.gather(
            *(self.runtime.store.get_call(call.record.call_sid) for call in live), return_exceptions=True
        )
        now = time.time()
        rows = []
        for call, stored in zip(live, records, strict=True):
            record = stored if isinstance(stored, CallRecord) else None
            meta = record.meta if record else {}
            entries = record.entries if record else []
            latencies = [e.get("mouth_to_ear_ms") for e in entries if e.get("kind") == "latency"]
            began = _epoch(call.record.started) or now
            number = meta.get("to" if call.record.direction == "outbound" else "from", "")
            rows.append(
                {
                    "call_sid": call.record.call_sid,
                    "number": mask_number(number),
                    "direction": call.record.direction,
                    "profile": call.record.profile,
                    "instance": call.record.instance,
                    "duration": _duration(now - began),
                    "phase": "orphaned" if call.orphaned else call.record.phase,
                    "barge_ins": sum(1 for e in entries if e.get("kind") == "interruption"),
                    "tool_calls": sum(1 for e in entries if e.get("kind") == "tool_call"),
                    "mouth_to_ear": f"{latencies[-1]} ms" if latencies else "–",
                    "cost": _cost(meta),
                }
            )
        return rows

    async def is_live(self, call_sid: str) -> bool:
        live = await self.runtime.ownership.live_calls()
        return any(call.record.call_sid == call_sid and not call.orphaned for call in live or [])


def _profile(runtime: Runtime, meta: dict[str, str]) -> AgentSettings | None:
    """The profile the call's record names (the default profile is not always listed by name)."""
    name = meta.get("profile", "")
    profiles = runtime.profiles
    return profiles.by_name.get(name) or (profiles.default if profiles.default.name == name else None)


def _cost(meta: dict[str, str]) -> str:
    try:
        return f"${float(meta.get('cost_usd') or 0):.4f}"
    except ValueError:
        return "–"


_NO_STORE = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


def _console(request: Request) -> Console | None:
    runtime: Runtime = request.app.state.runtime
    if not runtime.settings.console_token:
        return None
    console = getattr(request.app.state, "console", None)
    if console is None or console.runtime is not runtime:
        console = request.app.state.console = Console(runtime)
    return console


def _not_found() -> Response:
    return PlainTextResponse("Not Found", status_code=404)


def _to_signin() -> Response:
    return RedirectResponse("/console", status_code=303, headers={"Cache-Control": "no-store"})


async def _form(request: Request) -> dict[str, str] | None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return None


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# ---- sign-in ------------------------------------------------------------------------------------


async def signin_page(request: Request) -> Response:
    console = _console(request)
    if console is None:
        return _not_found()
    if console.session(request) is not None:
        return RedirectResponse("/console/live", status_code=303)
    return console.page("signin.html", error=None)


async def signin(request: Request) -> Response:
    console = _console(request)
    if console is None:
        return _not_found()
    store = console.runtime.store
    client = _client(request)
    try:
        if await store.signin_failures(client) >= SIGNIN_MAX_FAILURES:
            log.warning("console sign-in refused: too many failures from this client", extra={"client": client})
            return console.page(
                "signin.html",
                status=429,
                headers={"Retry-After": str(SIGNIN_WINDOW_S)},
                error="Too many failed sign-ins. Try again later.",
            )
    except StoreUnavailable:
        return console.page("signin.html", status=503, error="The state store is unavailable; try again.")
    form = await _form(request)
    token = (form or {}).get("token", "")
    if not token or not console.sessions.token_matches(token):
        try:
            failures = await store.count_signin_failure(client, SIGNIN_WINDOW_S)
        except StoreUnavailable:
            failures = 0
        log.warning("console sign-in failed (%d in this window)", failures, extra={"client": client})
        return console.page("signin.html", status=401, error="That token is not right.")
    cookie, session = console.sessions.issue()
    log.info("console sign-in", extra={"client": client, "who": session.who})
    response = RedirectResponse("/console/live", status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=console.sessions.ttl_s,
        path="/console",
        secure=console.secure_cookie,
        httponly=True,
        samesite="strict",
    )
    return response


async def signout(request: Request) -> Response:
    console = _console(request)
    if console is None:
        return _not_found()
    session = console.session(request)
    if session is None:
        return _to_signin()
    form = await _form(request) or {}
    if not Sessions.csrf_ok(session, form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)):
        return PlainTextResponse("CSRF token missing or wrong", status_code=403)
    response = RedirectResponse("/console", status_code=303)
    response.delete_cookie(COOKIE, path="/console", secure=console.secure_cookie, httponly=True, samesite="strict")
    return response


# ---- live calls ---------------------------------------------------------------------------------


async def live_page(request: Request) -> Response:
    console = _console(request)
    if console is None:
        return _not_found()
    session = console.session(request)
    if session is None:
        return _to_signin()
    try:
        rows = await console.live_rows()
    except StoreUnavailable:
        rows = None
    template = "live_rows.html" if request.query_params.get("fragment") else "live.html"
    return console.page(template, rows=rows, csrf=session.csrf, nav="live")


async def events(request: Request) -> Response:
    """Server-sent events: every call event of every instance (or of one call with ``?call=SID``)."""
    console = _console(request)
    if console is None:
        return _not_found()
    if console.session(request) is None:
        return PlainTextResponse("sign in first", status_code=401)
    only = request.query_params.get("call")
    runtime = console.runtime
    feed = runtime.store.console_events()

    async def stream() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        iterator = feed.__aiter__()
        pending: asyncio.Task[bytes] | None = None
        try:
            quiet_since = time.monotonic()
            while not runtime.draining:  # a draining instance lets its consoles go (they reconnect elsewhere)
                if pending is None:
                    pending = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=EVENT_DRAIN_CHECK_S)
                if not done:
                    if time.monotonic() - quiet_since >= EVENT_KEEPALIVE_S:
                        quiet_since = time.monotonic()
                        yield b": keep-alive\n\n"
                    continue
                message = pending.result()
                pending = None
                if not message:
                    yield b"event: ready\ndata: {}\n\n"
                    continue
                try:
                    event = orjson.loads(message)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(event, dict) or (only and event.get("call_sid") != only):
                    continue
                shown = {k: v for k, v in event.items() if k not in PRIVATE_FIELDS}
                yield b"data: " + orjson.dumps(shown) + b"\n\n"
        except (StopAsyncIteration, StoreUnavailable):
            return  # the browser reconnects (retry: 1000)
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await feed.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


# ---- one call -----------------------------------------------------------------------------------


def _transcript(entries: list[dict[str, Any]], t0: float) -> list[dict[str, str]]:
    lines = []
    for entry in entries:
        kind = entry.get("kind")
        at = f"{max(0.0, float(entry.get('t') or t0) - t0):.1f} s"
        if kind in ("caller", "assistant"):
            lines.append(
                {
                    "at": at,
                    "who": "Caller" if kind == "caller" else "Assistant",
                    "text": str(entry.get("text", "")),
                    "kind": kind,
                }
            )
        elif kind == "interruption":
            heard = entry.get("audio_end_ms", 0)
            lines.append(
                {
                    "at": at,
                    "who": "Barge-in",
                    "text": f"caller cut in after {heard} ms of {entry.get('received_ms', 0)} ms",
                    "kind": kind,
                }
            )
        elif kind == "dtmf":
            lines.append({"at": at, "who": "Keypad", "text": str(entry.get("digits", "")), "kind": kind})
        elif kind == "tool_call":
            lines.append(
                {
                    "at": at,
                    "who": "Tool call",
                    "text": f"{entry.get('name', '')}({entry.get('arguments', '')})",
                    "kind": kind,
                }
            )
        elif kind == "tool_result":
            lines.append({"at": at, "who": "Tool result", "text": str(entry.get("output", "")), "kind": kind})
        elif kind == "console":
            action = str(entry.get("action", ""))
            detail = entry.get("text") or entry.get("destination") or ""
            state = "" if entry.get("delivered") else ", not delivered"
            lines.append(
                {
                    "at": at,
                    "who": "Operator",
                    "text": f"{action} {detail}".strip() + f" ({entry.get('by', '')}{state})",
                    "kind": "console",
                }
            )
        elif kind == "system" and entry.get("event") == "call_ended":
            lines.append({"at": at, "who": "Ended", "text": str(entry.get("reason", "")), "kind": "ended"})
    return lines


async def call_page(request: Request) -> Response:
    console = _console(request)
    if console is None:
        return _not_found()
    session = console.session(request)
    if session is None:
        return _to_signin()
    call_sid = request.path_params["call_sid"]
    if not _valid_sid(call_sid):
        return console.page(
            "message.html", status=400, title="Invalid call SID", text="That is not a call SID.", nav=""
        )
    try:
        record = await console.runtime.store.get_call(call_sid)
        live = await console.is_live(call_sid)
    except StoreUnavailable:
        return console.page(
            "message.html", status=503, title="Unavailable", text="The state store is unavailable.", nav=""
        )
    if record is None:
        return console.page(
            "message.html", status=404, title="No such call", text="Nothing is stored for that call.", nav=""
        )
    meta = record.meta
    now = time.time()
    t0 = _epoch(meta.get("started", "")) or (float(record.entries[0].get("t", now)) if record.entries else now)
    t1 = now if live else (_epoch(meta.get("ended", "")) or now)
    number = meta.get("to" if meta.get("direction") == "outbound" else "from", "")
    profile = _profile(console.runtime, meta)
    context = {
        "call_sid": call_sid,
        "live": live,
        # followed until its record says it ended (its stream may be gone a moment before that is written)
        "watch": live or not meta.get("ended"),
        "meta": meta,
        "number": mask_number(number),
        "duration": _duration(t1 - t0),
        "cost": _cost(meta),
        "summary": record.summary,
        "usage": record.usage,
        "lines": _transcript(record.entries, t0),
        "timeline": timeline(record.entries, t0, t1),
        "destinations": sorted(profile.transfer_numbers) if profile is not None else [],
        "csrf": session.csrf,
        "done": request.query_params.get("done", ""),
        "nav": "",
    }
    template = "call_live.html" if request.query_params.get("fragment") else "call.html"
    return console.page(template, **context)


ACTIONS = {"hangup": "console_hangup", "transfer": "console_transfer", "instruct": "console_instruct"}


async def call_action(request: Request) -> Response:
    """An operator steps in: the command goes to the instance holding the call's stream."""
    console = _console(request)
    if console is None:
        return _not_found()
    session = console.session(request)
    if session is None:
        return PlainTextResponse("sign in first", status_code=401)
    call_sid = request.path_params["call_sid"]
    form = await _form(request)
    if form is None:
        return PlainTextResponse("form too large or malformed", status_code=400)
    if not Sessions.csrf_ok(session, form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)):
        log.warning("console action refused: CSRF token missing or wrong", extra={"call_sid": call_sid[:64]})
        return PlainTextResponse("CSRF token missing or wrong", status_code=403)
    if not _valid_sid(call_sid):
        return PlainTextResponse("invalid call SID", status_code=400)
    action = form.get("action", "")
    command = ACTIONS.get(action)
    if command is None:
        return PlainTextResponse("unknown action", status_code=400)
    args = {"command": command, "by": session.who}
    runtime = console.runtime
    if action == "transfer":
        destination = form.get("destination", "")
        try:
            record = await runtime.store.get_call(call_sid)
        except StoreUnavailable:
            return PlainTextResponse("state store unavailable", status_code=503)
        profile = _profile(runtime, record.meta) if record else None
        if profile is None or destination not in profile.transfer_numbers:
            return PlainTextResponse("not a transfer destination of the call's profile", status_code=400)
        args["destination"] = destination
    elif action == "instruct":
        text = form.get("text", "").strip()
        if not text:
            return PlainTextResponse("the instruction is empty", status_code=400)
        args["text"] = text[:1000]
    at = datetime.now(UTC).isoformat()
    try:
        delivered = await runtime.tell_call(call_sid, args)
    except StoreUnavailable:
        delivered = False
    log.info(
        "console action %s %s",
        action,
        "delivered" if delivered else "not delivered (no live stream)",
        extra={"call_sid": call_sid, "who": session.who, "client": _client(request), "at": at},
    )
    audit = {"kind": "console", "t": time.time(), "action": action, "by": session.who, "delivered": delivered}
    if delivered:  # written to the call's record (an action that reached no stream is only logged)
        detail: dict[str, str] = {key: args[key] for key in ("destination", "text") if key in args}
        runtime.store.add_entry(call_sid, {**audit, **detail})
        runtime.store.publish_event({"call_sid": call_sid, **audit})
    done = "sent" if delivered else "not-live"
    return RedirectResponse(f"/console/calls/{call_sid}?done={action}-{done}", status_code=303)


# ---- history ------------------------------------------------------------------------------------


def _day(text: str, *, end: bool) -> float | None:
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    return (day + timedelta(days=1)).timestamp() if end else day.timestamp()


async def history_page(request: Request) -> Response:
    console = _console(request)
    if console is None:
        return _not_found()
    session = console.session(request)
    if session is None:
        return _to_signin()
    params = request.query_params
    number = "".join(ch for ch in params.get("number", "") if ch.isdigit() or ch == "+")[:20]
    since_text, until_text = params.get("from", "")[:10], params.get("to", "")[:10]
    outcome = params.get("outcome", "")[:40]
    page_text = params.get("page", "1")
    page = int(page_text) if page_text.isdigit() and 0 < int(page_text) < 10_000 else 1
    since = _day(since_text, end=False) or 0.0
    until = _day(until_text, end=True) or math.inf
    try:
        found = await console.runtime.store.ended_calls(since, until, HISTORY_SCAN)
    except StoreUnavailable:
        return console.page(
            "message.html", status=503, title="Unavailable", text="The state store is unavailable.", nav="history"
        )
    digits = number.lstrip("+")
    matches = []
    outcomes = set()
    for call in found:
        meta = call.meta
        outcomes.add(meta.get("end_reason", ""))
        if digits and digits not in meta.get("from", "") and digits not in meta.get("to", ""):
            continue
        if outcome and meta.get("end_reason", "") != outcome:
            continue
        matches.append(call)
    pages = max(1, math.ceil(len(matches) / HISTORY_PAGE))
    shown = matches[(page - 1) * HISTORY_PAGE : page * HISTORY_PAGE]
    rows = [
        {
            "call_sid": call.call_sid,
            "ended": datetime.fromtimestamp(call.ended_at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "number": mask_number(call.meta.get("to" if call.meta.get("direction") == "outbound" else "from", "")),
            "direction": call.meta.get("direction", ""),
            "profile": call.meta.get("profile", ""),
            "duration": call.meta.get("duration_s", ""),
            "outcome": call.meta.get("end_reason", ""),
            "cost": _cost(call.meta),
        }
        for call in shown
    ]
    query = {"number": number, "from": since_text, "to": until_text, "outcome": outcome}

    def link(to: int) -> str:
        return "/console/history?" + urlencode({**{k: v for k, v in query.items() if v}, "page": to})

    return console.page(
        "history.html",
        rows=rows,
        query=query,
        outcomes=sorted(o for o in outcomes if o),
        page=page,
        pages=pages,
        total=len(matches),
        previous=link(page - 1) if page > 1 else None,
        next=link(page + 1) if page < pages else None,
        csrf=session.csrf,
        nav="history",
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/console", signin_page, methods=["GET"]),
        Route("/console", signin, methods=["POST"]),
        Route("/console/signout", signout, methods=["POST"]),
        Route("/console/live", live_page, methods=["GET"]),
        Route("/console/events", events, methods=["GET"]),
        Route("/console/history", history_page, methods=["GET"]),
        Route("/console/calls/{call_sid}", call_page, methods=["GET"]),
        Route("/console/calls/{call_sid}", call_action, methods=["POST"]),
    ]
