"""JSON logs: one object per line, call and stream SIDs on every call line, no secrets, no audio."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import orjson
import pytest
from conftest import API_KEY, AUTH_TOKEN
from ops_support import API_TOKEN, STREAM_SECRET, RelayProcess, caller_for

from relay import logs
from relay.security import mint_stream_token
from relay.sim import ulaw
from relay.sim.caller import SimulatedCaller
from relay.sim.realtime import RealtimeSimulator, SimConfig

pytestmark = pytest.mark.timeout(90)
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
CALL_LOGGERS = ("relay.bridge", "relay.call", "relay.tools")
LONG_BASE64 = re.compile(r"[A-Za-z0-9+]{48,}={0,2}")


# ---- the pieces, in-process ------------------------------------------------------------------


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger wired exactly like configure() wires the root (formatter, redactor, context)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter(logs.Redactor([API_KEY, AUTH_TOKEN, API_TOKEN, 'quo"te\\secret'])))
    handler.addFilter(logs.CallContext())
    logger = logging.getLogger("test.logs")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.handlers = []


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    parsed = [orjson.loads(line) for line in text.splitlines()]
    assert all(isinstance(entry, dict) for entry in parsed)
    return parsed


class Unserializable:
    def __repr__(self) -> str:
        return f"<Unserializable {API_KEY}>"


def test_every_record_is_one_json_object_on_one_line(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    logger.info('multi\nline\r\nmessage with "quotes" and µ-law', extra={"detail": {"a": [1, 2]}})
    logger.warning("odd extra", extra={"thing": Unserializable()})
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("it failed")
    entries = lines_of(stream)
    assert len(entries) == 3
    assert entries[0]["msg"] == 'multi\nline\r\nmessage with "quotes" and µ-law'
    assert entries[0]["detail"] == {"a": [1, 2]}
    assert {"ts", "level", "logger", "msg", "pid"} <= set(entries[0])
    assert entries[0]["level"] == "info" and entries[0]["logger"] == "test.logs"
    assert entries[2]["level"] == "error" and "ValueError: boom" in entries[2]["exc"]
    assert "call_sid" not in entries[0]  # not a call line


def test_secrets_never_reach_the_output(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    token = mint_stream_token(STREAM_SECRET.encode(), "CA" + "1" * 32, 60)
    other_key = "sk-proj-" + "Zq9" * 12  # not configured, but shaped like a key
    logger.info("key %s and token %s", API_KEY, AUTH_TOKEN)
    logger.info("stream token %s", token, extra={"headers": {"Authorization": f"Bearer {API_TOKEN}"}})
    logger.info("Authorization: Basic c29tZXRoaW5nLXNlY3JldA== other %s", other_key)
    logger.info("escaped", extra={"value": 'quo"te\\secret'})
    logger.warning("object", extra={"thing": Unserializable()})
    try:
        raise RuntimeError(f"connect failed with {API_KEY} and {token}")
    except RuntimeError:
        logger.exception("failure")
    text = stream.getvalue()
    for secret in (API_KEY, AUTH_TOKEN, API_TOKEN, token, other_key, "c29tZXRoaW5nLXNlY3JldA", 'quo\\"te\\\\secret'):
        assert secret not in text, secret
    _, _, nonce, mac = token.split(".")
    assert nonce not in text and mac not in text  # no part of the token, the MAC included
    assert logs.Redactor([]).scrub(f"token={token}&x=1") == f"token={logs.REDACTED}&x=1"
    assert text.count(logs.REDACTED) >= 9
    assert len(lines_of(stream)) == 6


def test_audio_never_reaches_the_output(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    frame = base64.b64encode(ulaw.synth_speech(20)).decode()
    message = orjson.dumps({"event": "media", "media": {"payload": frame}}).decode()
    logger.debug("frame %s", message)
    logger.debug("delta", extra={"event": {"type": "response.output_audio.delta", "delta": frame}})
    logger.debug("repr %r", {"payload": frame})
    logger.debug("bare %s", frame)  # no field name: long base64 runs go
    text = stream.getvalue()
    assert frame not in text and frame[:40] not in text
    assert text.count(logs.AUDIO_REDACTED) >= 4
    # identifiers stay readable
    logger.info("ids", extra={"call_sid": "CA" + "ab" * 16, "item": "item_3f9a2b10000000042"})
    assert lines_of(stream)[-1]["call_sid"] == "CA" + "ab" * 16


async def test_lines_logged_while_serving_a_call_carry_its_sids(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture

    async def serve(call_sid: str, stream_sid: str) -> None:
        logs.bind_call(call_sid, stream_sid)
        logger.info("in the call's task")
        await asyncio.create_task(asyncio.sleep(0))
        await asyncio.create_task(_log_later(logger, "in a task it started"))
        await asyncio.to_thread(logger.info, "in a worker thread")
        logs.call_logger("CAexplicit", "MZexplicit", "test.logs").info("explicit SIDs win")

    await asyncio.gather(serve("CA1", "MZ1"), serve("CA2", "MZ2"))
    logger.info("outside any call")
    entries = lines_of(stream)
    for sid in ("1", "2"):
        mine = [e for e in entries if e.get("call_sid") == f"CA{sid}"]
        assert [e["msg"] for e in mine] == ["in the call's task", "in a task it started", "in a worker thread"]
        assert all(e["stream_sid"] == f"MZ{sid}" for e in mine)
    assert sum(e.get("call_sid") == "CAexplicit" for e in entries) == 2
    outside = entries[-1]
    assert outside["msg"] == "outside any call" and "call_sid" not in outside
    # a call line before its stream exists (the webhook) says so: stream_sid is null, not missing
    logs.call_logger("CA3", name="test.logs").info("webhook")
    assert lines_of(stream)[-1]["stream_sid"] is None


async def _log_later(logger: logging.Logger, message: str) -> None:
    await asyncio.sleep(0)
    logger.info(message)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    names = ("websockets", "uvicorn.error", "twilio.http_client", "hpack", "uvicorn", "uvicorn.access")
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in names})
    yield
    handlers, level, levels = saved
    root.handlers = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_logging")
def test_configure_applies_the_level_and_keeps_frame_loggers_quiet() -> None:
    out = io.StringIO()
    logs.configure("WARNING", [API_KEY], stream=out)
    logging.getLogger("relay.test").info("hidden")
    logging.getLogger("relay.test").warning("shown %s", API_KEY)
    assert [e["msg"] for e in lines_of(out)] == ["shown [redacted]"]

    out = io.StringIO()
    logs.configure("DEBUG", [], stream=out)
    logging.getLogger("relay.test").debug("debug shown")
    logging.getLogger("websockets.client").debug("> TEXT frame")  # frames would carry audio
    logging.getLogger("uvicorn.error").debug("< TEXT frame")
    logging.getLogger("twilio.http_client").info("Headers:")
    assert [e["msg"] for e in lines_of(out)] == ["debug shown"]


# ---- a whole relay process at LOG_LEVEL=debug -------------------------------------------------


class _TwilioApi(BaseHTTPRequestHandler):
    """Answers the REST call update (hang-up) like Twilio does."""

    calls: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        self.calls.append(self.path)
        sid = self.path.rsplit("/", 1)[-1].removesuffix(".json")
        body = json.dumps({"sid": sid, "account_sid": ACCOUNT_SID, "status": "completed"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def twilio_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TwilioApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def _full_call(caller: SimulatedCaller, *, assistant_hangs_up: bool = False) -> str:
    """Webhook, stream, greeting, one spoken turn (answered with a tool call), a key press and junk."""
    status, body = await caller.webhook()
    assert status == 200
    stream = caller.parse_twiml(body)
    await caller.connect(stream)
    assert await caller.wait_for_audio(300, timeout=5)
    await caller.wait_idle(timeout=5)
    caller.say(ulaw.synth_speech(500) + ulaw.silence(700))
    if assistant_hangs_up:
        assert await caller.wait_closed(timeout=10) == 1000
        return stream.parameters["token"]
    await caller.wait_for_audio(600, timeout=5)
    await caller.wait_idle(timeout=5)
    await caller.enter("7#")
    assert caller._ws is not None
    await caller._ws.send('{"event":"media","media":{"payload":"not base64!"}}')
    await caller.wait_for_audio(900, timeout=5)
    await caller.wait_idle(timeout=5)
    return stream.parameters["token"]


async def test_a_debug_level_relay_process_logs_json_with_sids_and_no_secrets_or_audio(twilio_api: str) -> None:
    sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=400, reply_ms=400))
    await sim.start()
    relay = RelayProcess(
        sim.url,
        LOG_LEVEL="debug",
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_API_BASE=twilio_api,
        RELAY_END_CALL_TIMEOUT="2",
    )
    callers: list[SimulatedCaller] = []
    tokens: list[str] = []
    responses: list[httpx.Response] = []
    try:
        await relay.start()
        async with httpx.AsyncClient(trust_env=False) as http:
            # error responses: a forged webhook, the calls API without / with a wrong token
            forged = caller_for(relay).webhook_form()
            responses.append(
                await http.post(relay.base_url + "/incoming-call", data=forged, headers={"X-Twilio-Signature": "AAAA"})
            )
            responses.append(await http.get(relay.base_url + "/calls/CA" + "0" * 32))
            wrong = {"Authorization": f"Bearer {AUTH_TOKEN}"}
            responses.append(await http.get(relay.base_url + "/calls/CA" + "0" * 32, headers=wrong))
        assert [r.status_code for r in responses] == [403, 401, 401]

        # a call with a tool call, a key press and a malformed frame; the caller hangs up
        sim.config.function_calls_on_turn = {1: [("lookup_order", '{"order_id": "10042"}')]}
        talker = caller_for(relay)
        tokens.append(await _full_call(talker))
        await talker.hangup()
        callers.append(talker)

        # a call the assistant ends (end_call tool -> Twilio REST hang-up)
        sim.config.function_calls_on_turn = {1: [("end_call", '{"reason": "caller is done"}')]}
        ended = caller_for(relay)
        tokens.append(await _full_call(ended, assistant_hangs_up=True))
        callers.append(ended)
        assert any(ended.call_sid in path for path in _TwilioApi.calls)

        # a call whose Realtime session is refused for a bad key (the error text quotes the key)
        sim.config.function_calls_on_turn = {}
        sim.config.expected_api_key = "sk-another-key-entirely-000000"
        refused = caller_for(relay)
        _, body = await refused.webhook()
        tokens.append(refused.parse_twiml(body).parameters["token"])
        await refused.connect(refused.parse_twiml(body))
        assert await refused.wait_closed(timeout=5) == 1000
        callers.append(refused)

        record = await relay.get(f"/calls/{talker.call_sid}", headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert record.status_code == 200
        responses.append(record)

        relay.signal(signal.SIGTERM)
        assert await relay.wait(timeout=15) == 0
    finally:
        await relay.close()
        await sim.stop()

    output = relay.output()
    lines = relay.lines  # every stdout line is one JSON object
    assert relay.stderr == [], relay.stderr[:5]

    # LOG_LEVEL=debug is respected, yet no frame-level chatter
    levels = {line["level"] for line in lines}
    assert "debug" in levels and "info" in levels
    assert not [line for line in lines if line["logger"].startswith(("websockets", "twilio.http_client"))]

    # secrets: neither in the logs nor in any error response
    settings_secrets = [API_KEY, AUTH_TOKEN, API_TOKEN, STREAM_SECRET, *tokens]
    for secret in settings_secrets:
        assert secret not in output, secret
        for response in responses:
            assert secret not in response.text, (secret, response.text)

    # raw audio: no payload either way, and nothing that even looks like one
    for caller in callers:
        for payload in {*caller.sent_payloads, *caller.received_payloads}:
            assert payload not in output
    assert not LONG_BASE64.search(output)
    assert logs.AUDIO_REDACTED not in output  # nothing tried to log audio

    # call correlation: every line about a call carries its call SID and stream SID
    for caller in callers:
        mentions = [line for line in lines if caller.call_sid in orjson.dumps(line).decode()]
        assert len(mentions) >= 3
        for line in mentions:
            assert line.get("call_sid") == caller.call_sid, line
            assert "stream_sid" in line, line
        streamed = [line for line in mentions if line["logger"] in CALL_LOGGERS]
        assert streamed, caller.call_sid
        assert all(line["stream_sid"] == caller.stream_sid for line in streamed)
        webhook = [line for line in mentions if line["logger"] == "relay.app"]
        assert webhook and all(line["stream_sid"] is None for line in webhook)
    call_lines = [line for line in lines if line["logger"] in CALL_LOGGERS]
    assert call_lines and all(line.get("call_sid") and line.get("stream_sid") for line in call_lines)
    msgs = {line["msg"] for line in lines}
    assert {"call started", "call ended"} <= msgs
    assert any(line["msg"].startswith("malformed Twilio frame") for line in lines)
