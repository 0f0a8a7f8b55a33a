"""A relay exposed to hostile clients: what they can make it log, hold open, buffer or believe.

Against real `python -m relay serve` processes: junk and silence before a stream's `start`, floods of
ignored frames on an admitted call, oversized and idle HTTP connections, peer text in log lines,
and X-Forwarded-Host from peers that are not trusted proxies.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from conftest import AUTH_TOKEN
from conftest import wait_for as eventually
from ops_support import RelayProcess, caller_for, metric, parse_metrics
from twilio.request_validator import RequestValidator

from relay.forwarded import ForwardedHeaders, TrustedProxies
from relay.logbound import LOGGED_EACH, RepeatLimiter, clip, lines_for
from relay.sim import ulaw
from relay.sim.realtime import RealtimeSimulator

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def sim(fast_sim: RealtimeSimulator) -> RealtimeSimulator:
    return fast_sim


async def started(sim: RealtimeSimulator, **env: str) -> RelayProcess:
    return await RelayProcess(sim.url, **env).start()


async def refused(relay: RelayProcess, reason: str) -> float:
    response = await relay.get("/metrics")
    return metric(parse_metrics(response.text)[1], "relay_calls_refused_total", reason=reason)


def ws_url(relay: RelayProcess) -> str:
    return f"ws://127.0.0.1:{relay.port}/media-stream"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def control_free(value: Any) -> bool:
    """No string in a logged value carries a newline or another control character."""
    if isinstance(value, str):
        return value.isprintable()
    if isinstance(value, dict):
        return all(control_free(v) for v in value.values())
    if isinstance(value, list):
        return all(control_free(v) for v in value)
    return True


# ---- the limiter and clip, on their own ------------------------------------------------------------


def test_repeat_limiter_logs_the_first_few_then_powers_of_ten_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test.repeats")
    limiter = RepeatLimiter(logging.getLogger("test.repeats"))
    for _ in range(1200):
        limiter.log("a", logging.WARNING, "kind a")
    for _ in range(3):
        limiter.log("b", logging.DEBUG, "kind b %s", "x")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        *["kind a"] * LOGGED_EACH,
        "kind a (10 so far on this call)",
        "kind a (100 so far on this call)",
        "kind a (1000 so far on this call)",
        *["kind b x"] * 3,
    ]
    assert limiter.counts == {"a": 1200, "b": 3}
    assert lines_for(1200) == LOGGED_EACH + 3 and lines_for(500) == 7 and lines_for(0) == 0
    assert all(r.pathname == __file__ for r in caplog.records)  # lines name their caller, not the limiter


def test_clip_escapes_control_characters_and_bounds_the_length() -> None:
    assert clip("CA0123") == "CA0123"
    assert clip("a\nb\x1b[2J") == "a\\nb\\x1b[2J"
    long = clip("CA\n" + "x" * 10_000)
    assert long.startswith("CA\\nxxx") and long.endswith("…(10003 chars)") and long.isprintable()
    assert len(long) < 100


def test_trusted_proxies_read_addresses_networks_star_and_literals() -> None:
    proxies = TrustedProxies("10.0.0.1, 192.168.0.0/16,fd00::/8 , unix:/run/relay.sock")
    assert "10.0.0.1" in proxies and "192.168.7.9" in proxies and "fd00::1" in proxies
    assert "unix:/run/relay.sock" in proxies
    assert "10.0.0.2" not in proxies and "127.0.0.1" not in proxies and "evil" not in proxies
    assert None not in proxies and "" not in proxies
    assert "203.0.113.5" in TrustedProxies("*")


def test_trusted_proxies_match_an_ipv4_mapped_ipv6_peer_as_its_ipv4_address() -> None:
    proxies = TrustedProxies("127.0.0.0/8,10.0.0.1")
    assert "::ffff:10.0.0.1" in proxies and "::ffff:127.0.0.1" in proxies
    assert "::ffff:10.0.0.2" not in proxies and "::ffff:192.0.2.1" not in proxies


async def test_a_trusted_ipv4_mapped_peer_has_its_forwarded_scheme_applied() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    middleware = ForwardedHeaders(app, "10.0.0.1")
    headers = [(b"host", b"relay.internal"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"a.example")]
    for peer in ("10.0.0.1", "::ffff:10.0.0.1", "::ffff:10.0.0.2"):
        scope = {"type": "http", "scheme": "http", "client": (peer, 4000), "headers": headers}
        await middleware(scope, None, None)  # type: ignore[arg-type]
    assert [s["scheme"] for s in seen] == ["https", "https", "http"]
    assert [any(name == b"x-forwarded-host" for name, _ in s["headers"]) for s in seen] == [True, True, False]


# ---- before `start` -----------------------------------------------------------------------------------


async def test_junk_before_start_is_closed_after_four_frames_with_one_log_line(sim: RealtimeSimulator) -> None:
    relay = await started(sim, RELAY_START_TIMEOUT="30", LOG_LEVEL="info")
    try:
        before = len(relay.stdout)
        t0 = time.monotonic()
        async with websockets.connect(ws_url(relay), proxy=None, compression=None) as ws:
            sent = 0
            try:
                for i in range(1000):
                    await ws.send(f"{{not json {i}")
                    sent += 1
            except websockets.ConnectionClosed:
                pass
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), timeout=10)
        assert time.monotonic() - t0 < 10  # the allowance, not the 30 s start timeout
        assert ws.close_code == 1008
        reason = "too many frames before start"
        assert await eventually(lambda: any(reason in line for line in relay.stdout), timeout=5)
        await asyncio.sleep(0.5)  # the socket's close has been logged by now, if it were
        about_it = [orjson.loads(line) for line in relay.stdout[before:]]
        assert len(about_it) == 1, about_it  # uvicorn's per-connection lines too are debug lines here
        assert about_it[0]["level"] == "warning"
        assert about_it[0]["msg"].startswith(
            "stream refused: too many frames before start: 4 without a start, 4 of them unreadable (first: malformed"
        )
        assert await refused(relay, reason) == 1
    finally:
        await relay.close()


def bogus_start(i: int) -> str:
    sid = "MZ" + "a" * 32
    params = {"token": "v2.1.x.y"}
    return orjson.dumps(
        {
            "event": "start",
            "streamSid": sid,
            "start": {"streamSid": sid, "callSid": f"CA{i:032d}", "customParameters": params},
        }
    ).decode()


async def test_refusals_before_admission_are_logged_boundedly_per_process_and_all_counted(
    sim: RealtimeSimulator,
) -> None:
    relay = await started(sim)
    try:

        async def one(i: int) -> int | None:
            async with websockets.connect(ws_url(relay), proxy=None, compression=None) as ws:
                if i == 0:  # two unreadable frames first: still this socket's one line
                    await ws.send("{junk")
                    await ws.send("{junk")
                await ws.send(bogus_start(i))
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), timeout=5)
                return ws.close_code

        codes = [await one(0)]
        for batch in range(1, 200, 20):
            codes += await asyncio.gather(*(one(i) for i in range(batch, min(batch + 20, 200))))
        assert codes == [1008] * 200
        assert await refused(relay, "stream token rejected") == 200
        # each line is written before its socket's close; the pipe reader may lag behind
        assert await eventually(lambda: relay.output().count("stream refused") == lines_for(200))
        refusals = [m["msg"] for m in relay.lines if m["msg"].startswith("stream refused")]
        assert len(refusals) == lines_for(200) == LOGGED_EACH + 2  # 1 to 5, then at 10 and 100
        assert refusals[0].startswith("stream refused: stream token rejected: malformed token (2 frames before start")
        assert "skipped, first: malformed (invalid JSON" in refusals[0]
        assert refusals[-1].endswith("(100 so far since start-up)")
        assert not any("frames before start skipped" in m["msg"] for m in relay.lines[1:] if m["msg"] not in refusals)
    finally:
        await relay.close()


async def test_frames_skipped_before_an_admitted_start_are_told_on_the_call_started_line(
    sim: RealtimeSimulator,
) -> None:
    relay = await started(sim)
    try:
        caller = caller_for(relay)
        status, body = await caller.webhook()
        assert status == 200, body
        parameters = caller.parse_twiml(body).parameters
        sid = "MZ" + "b" * 32
        start = {"streamSid": sid, "callSid": caller.call_sid, "customParameters": parameters}
        async with websockets.connect(ws_url(relay), proxy=None, compression=None) as ws:
            await ws.send("{junk")
            await ws.send(b"binary")
            await ws.send(orjson.dumps({"event": "start", "streamSid": sid, "start": start}).decode())
            assert await eventually(lambda: relay.output().count("call started") == 1)
        lines = [m for m in relay.lines if "skipped" in m["msg"] or m["msg"].startswith("call started")]
        assert len(lines) == 1, lines  # one line for the socket, at the level the skipped frames deserve
        assert lines[0]["level"] == "warning"
        assert lines[0]["msg"].startswith("call started (2 frames before start skipped, first: malformed (invalid JSON")
    finally:
        await relay.close()


def masked_text_frame(payload: bytes) -> bytes:
    """One client-to-server text frame (RFC 6455 §5.2), short payloads only."""
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_client_that_ignores_the_close_is_not_read_for_long(sim: RealtimeSimulator) -> None:
    """A raw client that never reads what the relay sends, and keeps sending junk after the close."""
    relay = await started(sim, RELAY_START_TIMEOUT="30")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /media-stream HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        junk = masked_text_frame(b"{junk" + b"x" * 100) * 50
        t0 = time.monotonic()
        with pytest.raises(ConnectionError):
            while time.monotonic() - t0 < 8:
                writer.write(junk)
                await writer.drain()
        # dropped about a second after it went on sending past the close (uvicorn alone: 10 s)
        assert time.monotonic() - t0 < 5
        writer.close()
        assert await refused(relay, "too many frames before start") == 1
    finally:
        await relay.close()


async def test_sockets_waiting_for_start_are_capped_and_the_longest_waiting_makes_room(
    sim: RealtimeSimulator,
) -> None:
    relay = await started(sim, RELAY_START_TIMEOUT="30", RELAY_MAX_PENDING_STREAMS="3")
    silent = []
    try:
        for _ in range(3):
            silent.append(await websockets.connect(ws_url(relay), proxy=None, compression=None))
            await asyncio.sleep(0.05)  # their order of arrival decides which one waited longest
        # with every slot taken by a socket that sends nothing, a real stream still gets in
        caller = caller_for(relay)
        await caller.connect()
        assert await caller.wait_for_audio(100, timeout=10)
        oldest = silent[0]
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(oldest.recv(), timeout=5)
        assert oldest.close_code == 1008
        assert [ws.state for ws in silent[1:]] == [websockets.protocol.State.OPEN] * 2
        assert await refused(relay, "pending_streams") == 1
        assert relay.output().count("closing the one waiting longest") == 1
        # an attacker opening more sockets only closes its own older ones: two wait, the first new one
        # takes the free slot, each of the other four closes the oldest
        for _ in range(5):
            silent.append(await websockets.connect(ws_url(relay), proxy=None, compression=None))
        assert await refused(relay, "pending_streams") == 5
        assert caller.close_code is None  # the admitted call was never a candidate
        await caller.hangup()
    finally:
        for ws in silent:
            await ws.close()
        await relay.close()


# ---- after admission ------------------------------------------------------------------------------------


async def test_floods_of_ignored_frames_cost_a_bounded_number_of_lines_even_at_debug(sim: RealtimeSimulator) -> None:
    relay = await started(sim, LOG_LEVEL="debug")
    try:
        caller = caller_for(relay)
        await caller.connect()
        assert await caller.wait_for_audio(200, timeout=10)
        assert await caller.wait_idle(timeout=10)
        ws = caller._ws
        assert ws is not None
        second_start = orjson.dumps(
            {
                "event": "start",
                "start": {"streamSid": caller.stream_sid, "callSid": caller.call_sid, "customParameters": {}},
                "streamSid": caller.stream_sid,
            }
        ).decode()
        for i in range(500):
            await ws.send(b"\x00\x01binary")
            await ws.send(second_start)
            await ws.send(orjson.dumps({"event": f"bogus{i}", "streamSid": caller.stream_sid}).decode())
            name = f"0.unknown-{i}" if i % 50 else "0." + "m" * 20_000  # some oversized
            mark = {"event": "mark", "streamSid": caller.stream_sid, "mark": {"name": name}}
            await ws.send(orjson.dumps(mark).decode())
        heard = caller.played_bytes
        await caller.say_and_wait(ulaw.synth_speech(400))
        assert await caller.wait_for_audio(heard // ulaw.ULAW_BYTES_PER_MS + 200, timeout=10)  # still relaying
        await caller.hangup()
        assert await eventually(lambda: any('"call ended"' in line for line in relay.stdout), timeout=10)
        lines = relay.lines
        per_kind = {
            "binary": [m for m in lines if m["msg"].startswith("binary frame from Twilio ignored")],
            "second start": [m for m in lines if m["msg"].startswith("second start message")],
            "unknown event": [m for m in lines if m["msg"].startswith("unknown Twilio event")],
            "bad mark": [m for m in lines if m["msg"].startswith("mark ") and "is not pending" in m["msg"]],
        }
        # 1..5 one by one, then "(10 so far on this call)" and "(100 so far on this call)"
        assert {kind: len(found) for kind, found in per_kind.items()} == dict.fromkeys(per_kind, 7)
        assert all(m["call_sid"] == caller.call_sid for found in per_kind.values() for m in found)
        assert per_kind["binary"][-1]["msg"] == "binary frame from Twilio ignored (100 so far on this call)"
        assert max(len(m["msg"]) for m in per_kind["bad mark"]) < 150
        ended = next(m for m in lines if m["msg"] == "call ended")
        assert ended["ignored_from_twilio"] == {
            "binary_frame": 500,
            "second_start": 500,
            "unknown_event": 500,
            "unknown_mark": 500,
        }
    finally:
        await relay.close()


# ---- HTTP, exposed directly -----------------------------------------------------------------------------


async def _send_huge_headers(port: int, header_bytes: int) -> bytes:
    """One request whose headers are `header_bytes` long; what came back (b"" if only closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"a" * 65536
    try:
        writer.write(b"POST /incoming-call HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\nX-Pad: ")
        for _ in range(header_bytes // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write(b"\r\n\r\n")
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    try:
        return await asyncio.wait_for(reader.read(200), timeout=10)
    except (ConnectionError, OSError):
        return b""
    finally:
        writer.close()


async def test_huge_request_headers_are_refused_without_buffering_them(sim: RealtimeSimulator) -> None:
    relay = await started(sim)
    try:
        assert (await relay.get("/healthz")).status_code == 200
        before = rss_kib(relay.pid)
        answers = await asyncio.gather(*[_send_huge_headers(relay.port, 10 * 1024 * 1024) for _ in range(10)])
        after = rss_kib(relay.pid)
        # refused once over the limit; a client still sending then sees the close (a reset) rather than the 431
        assert all(a == b"" or a.startswith(b"HTTP/1.1 431 ") for a in answers), answers
        print(f"serve RSS {before} kB -> {after} kB after 10 x 10 MB of headers")
        assert after - before < 4 * 1024
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Pad: " + b"a" * 33 * 1024)  # and waits
        answer = await asyncio.wait_for(reader.read(200), timeout=5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert (await relay.get("/healthz")).status_code == 200
    finally:
        await relay.close()


async def test_a_100_kb_url_gets_414(sim: RealtimeSimulator) -> None:
    relay = await started(sim)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET /healthz?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: relay\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), timeout=10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 414 ")
        assert (await relay.get("/healthz?" + "q" * 1000)).status_code == 200
    finally:
        await relay.close()


async def test_idle_and_half_sent_connections_are_closed_after_the_idle_timeout(sim: RealtimeSimulator) -> None:
    relay = await started(sim, RELAY_HTTP_IDLE_TIMEOUT="1")
    try:
        connections = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(50)]
        for _, writer in connections[25:]:  # half start a request and never finish its headers
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n")
            await writer.drain()

        async def closed_by_server(reader: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(100), timeout=6) == b""
            except TimeoutError:
                return False
            except ConnectionError:
                return True

        t0 = time.monotonic()
        closed = await asyncio.gather(*[closed_by_server(reader) for reader, _ in connections])
        elapsed = time.monotonic() - t0
        still_open = closed.count(False)
        print(f"{still_open} of 50 idle connections open {elapsed:.1f} s after they were made")
        assert still_open == 0
        assert 0.5 < elapsed < 5
        for _, writer in connections:
            writer.close()
        assert (await relay.get("/healthz")).status_code == 200
    finally:
        await relay.close()


WEBHOOK_HEAD = (
    b"POST /incoming-call HTTP/1.1\r\nHost: relay\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 1000\r\n\r\n"
)


async def test_a_trickled_webhook_body_is_answered_408_within_the_idle_timeout(sim: RealtimeSimulator) -> None:
    relay = await started(sim, RELAY_HTTP_IDLE_TIMEOUT="1", LOG_LEVEL="info")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(WEBHOOK_HEAD)
        await writer.drain()
        t0 = time.monotonic()

        async def trickle() -> None:
            # a body byte every 0.3 s until shortly before the deadline: were each byte to reset the
            # timer, the answer would come at 1.9 s. (Bytes still arriving when the server closes
            # would turn its close into a reset that can discard the 408.)
            for _ in range(3):
                await asyncio.sleep(0.3)
                writer.write(b"a")
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        answer = await asyncio.wait_for(reader.read(), timeout=8)
        elapsed = time.monotonic() - t0
        await trickling
        writer.close()
        print(f"slow body answered after {elapsed:.1f} s")
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert 0.8 < elapsed < 1.8
        assert await eventually(lambda: any("408" in line for line in relay.stdout))
        assert [m["msg"] for m in relay.lines if "408" in m["msg"]] == [
            "webhook body not received within 1 s; answered 408"
        ]
        assert "Traceback" not in relay.output()
    finally:
        await relay.close()


async def test_a_client_leaving_mid_body_costs_one_line_and_no_traceback(sim: RealtimeSimulator) -> None:
    relay = await started(sim, LOG_LEVEL="info")
    try:
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(WEBHOOK_HEAD + b"CallSid=CA")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
        assert await eventually(lambda: sum("disconnected" in line for line in relay.stdout) == 3)
        assert (await relay.get("/healthz")).status_code == 200
        lines = relay.lines
        assert [m["msg"] for m in lines if "disconnect" in m["msg"].lower()] == [
            "webhook client disconnected before sending its whole body"
        ] * 3
        assert not any("ASGI" in m["msg"] for m in lines)
        assert "Traceback" not in relay.output() and "ClientDisconnect" not in relay.output()
    finally:
        await relay.close()


async def test_peer_text_in_log_lines_is_short_and_single_line(sim: RealtimeSimulator) -> None:
    relay = await started(sim)
    try:
        claimed = ('CA\nforged line {"level":"error"}\r\n' + "x" * 200) * 40  # ~10 KB
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            response = await http.post(
                relay.base_url + "/incoming-call?" + "u" * 7000 + "%0A",
                data={"CallSid": claimed},
                headers={"X-Twilio-Signature": "forged"},
            )
        assert response.status_code == 403
        assert await eventually(lambda: any("webhook refused" in line for line in relay.stdout))
        raw = next(line for line in relay.stdout if "webhook refused" in line)
        entry = orjson.loads(raw)
        assert control_free(entry), entry
        assert len(raw) < 800
        assert entry["call_sid"].startswith("CA\\nforged line")
    finally:
        await relay.close()


async def test_a_flood_of_unsigned_webhooks_costs_a_bounded_number_of_lines_and_each_is_counted(
    sim: RealtimeSimulator,
) -> None:
    relay = await started(sim)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            for i in range(20):
                response = await http.post(
                    relay.base_url + "/incoming-call",
                    data={"CallSid": f"CA{i:032d}"},
                    headers={"X-Twilio-Signature": "forged"},
                )
                assert response.status_code == 403
        assert await refused(relay, "bad_signature") == 20
        await asyncio.sleep(0.3)
        lines = [line for line in relay.lines if line["msg"].startswith("webhook refused")]
        assert len(lines) == lines_for(20)  # the first few, then at 10: not one line per request
        assert lines[-1]["msg"].endswith("(10 so far since start-up)")
    finally:
        await relay.close()


async def test_invalid_utf8_text_frame_closes_1007_without_a_traceback(sim: RealtimeSimulator) -> None:
    relay = await started(sim)
    try:
        async with websockets.connect(ws_url(relay), proxy=None, compression=None) as ws:
            await ws.send(b"\xff\xfe not utf-8", text=True)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), timeout=5)
        assert ws.close_code == 1007
        assert await eventually(lambda: any("invalid UTF-8" in line for line in relay.stdout))
        lines = relay.lines
        assert [m["msg"] for m in lines if "UTF-8" in m["msg"]] == [
            "invalid UTF-8 in a text frame (at byte 0); closing with 1007"
        ]
        assert not any("exc" in m for m in lines)
        assert "Traceback" not in relay.output()
    finally:
        await relay.close()


# ---- X-Forwarded-Host --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "public_base"),
    [("10.0.0.1", "http://127.0.0.1:{port}"), ("10.0.0.1,127.0.0.0/8", "https://evil.example")],
)
async def test_forwarded_host_is_honoured_only_from_trusted_proxies(
    sim: RealtimeSimulator, allow: str, public_base: str
) -> None:
    relay = await started(sim, PUBLIC_URL="", FORWARDED_ALLOW_IPS=allow)
    try:
        base = public_base.format(port=relay.port)
        # Twilio signs the URL it posted to; without PUBLIC_URL the relay rebuilds it from the request,
        # with the forwarded scheme and host only when they come from a trusted proxy.
        form = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222"}
        signature = RequestValidator(AUTH_TOKEN).compute_signature(base + "/incoming-call", form)
        headers = {"X-Twilio-Signature": signature, "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            response = await http.post(relay.base_url + "/incoming-call", data=form, headers=headers)
        assert response.status_code == 200, response.text
        stream = ET.fromstring(response.text).find("./Connect/Stream")
        assert stream is not None
        assert stream.get("url") == base.replace("http", "ws", 1) + "/media-stream"
    finally:
        await relay.close()
