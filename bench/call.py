"""One simulated phone call of the load generator: its set-up, its 20 ms tick and what it receives.

Each call does what Twilio does: POSTs the signed voice webhook, reads ``<Connect><Stream>`` from
the TwiML, opens the Media Stream with ``X-Twilio-Signature`` on the upgrade, sends ``connected``
and ``start`` (the TwiML ``<Parameter>``s, stream token included, in ``customParameters``), then a
20 ms µ-law frame every 20 ms in real time. It plays the relay's audio at 8 bytes per ms, echoes
each mark only once the audio before it has played (all pending marks at once on ``clear``), talks
now and then, and sometimes barges in on the answer.

Every caller frame carries a marker (call, sequence, send time; see bench.markers) that the
Realtime simulator's probe reads on arrival; every assistant chunk carries one the simulator wrote,
read here on arrival. ``--mode direct`` talks to the simulator itself (no relay): the baseline.
"""

from __future__ import annotations

import asyncio
import binascii
import random
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import orjson
from twilio.request_validator import RequestValidator

from bench import markers
from bench.floor import SESSION_UPDATE  # the same minimal µ-law session as the floor relay
from bench.ws import WsClient, connect
from relay.sim import ulaw

if TYPE_CHECKING:
    from bench.generator import Generator

FRAME_BYTES = 160
ACCOUNT_SID = "AC" + "be9c4" * 6 + "00"
STREAM_USER_AGENT = "Twilio.TmeWs/1.0"
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
SILENCE = bytes([ulaw.SILENCE_BYTE]) * FRAME_BYTES
AUDIO_DELTA_TYPES = (b"response.output_audio.delta", b"response.audio.delta")


class Call:
    """One simulated phone call; ticked every 20 ms by the scheduler."""

    def __init__(self, gen: Generator, index: int) -> None:
        self.gen = gen
        self.index = index
        self.tag = gen.cfg.index_base + index  # the call's number in markers (a warm-up wave uses others)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.from_number = f"+1555{gen.cfg.index_base + index:07d}"
        self.rng = random.Random(gen.cfg.seed * 100_003 + index)
        self.ws: WsClient | None = None
        self.twilio = gen.cfg.mode == "twilio"
        self.error = ""
        self.closed = False
        self.close_code: int | None = None
        self.hanging_up = False
        # microphone
        self.seq = 0  # Twilio sequenceNumber
        self.frames_sent = 0
        self.speech: bytes | None = None
        self.speech_pos = 0
        self.state = "wait"
        self.next_speech_at = 0.0
        self.barge_at_ms: int | None = None
        self.reply_from = 0  # recv position when the utterance ended: audio past it is the answer
        self.utterances = 0
        self.barge_ins = 0
        self.reply_wait_since = 0.0
        # speaker
        self.buffered = 0
        self.recv_pos = 0
        self.play_pos = 0
        self.pending_marks: deque[tuple[int, str]] = deque()
        self.last_media_at = 0.0
        self.last_stamp_us = 0
        # counters
        self.deltas = 0
        self.down_bytes = 0
        self.down_unmarked = 0
        self.down_last_seq = -1
        self.down_gaps = 0
        self.down_reordered = 0
        self.crosstalk = 0
        self.marks_in = 0
        self.marks_echoed = 0
        self.clears: list[float] = []
        self.unknown_events = 0

    # ---- setup ---------------------------------------------------------------------------

    async def open(self) -> None:
        cfg = self.gen.cfg
        if self.twilio:
            url, parameters = await self._webhook()
            signature = RequestValidator(cfg.auth_token).compute_signature(url, {})
            self.ws = await connect(url, {"X-Twilio-Signature": signature}, STREAM_USER_AGENT)
            self.ws.on_text = self.on_twilio
            self.ws.on_close = self.on_close
            start = {
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": ACCOUNT_SID,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
                "streamSid": self.stream_sid,
            }
            self.ws.send_text('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            self.ws.send_text(orjson.dumps(start).decode())
            self.seq = 1
        else:
            self.ws = await connect(
                cfg.target + "?model=gpt-realtime", {"Authorization": "Bearer bench-direct"}, "bench"
            )
            self.ws.on_text = self.on_realtime
            self.ws.on_close = self.on_close
            self.ws.send_text(SESSION_UPDATE)
        # Spread first turns over a whole conversation cycle so answers (bursts of audio) do not line up.
        self.next_speech_at = time.monotonic() + self.rng.uniform(0.3, 6.0)

    async def _webhook(self) -> tuple[str, dict[str, str]]:
        """POST the voice webhook exactly as Twilio signs it; return the stream URL and parameters."""
        cfg = self.gen.cfg
        form = {
            "CallSid": self.call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": self.from_number,
            "To": "+15550002222",
            "CallStatus": "ringing",
            "Direction": "inbound",
            "ApiVersion": "2010-04-01",
            "Caller": self.from_number,
            "Called": "+15550002222",
        }
        public = (cfg.public_url or cfg.target).rstrip("/") + "/incoming-call"
        signature = RequestValidator(cfg.auth_token).compute_signature(public, form)
        body = urlencode(form).encode()
        parts = urlsplit(cfg.target)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            head = (
                f"POST /incoming-call HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: {WEBHOOK_USER_AGENT}\r\n"
                f"Content-Type: application/x-www-form-urlencoded\r\nX-Twilio-Signature: {signature}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        header, _, text = raw.partition(b"\r\n\r\n")
        status = header.split(b" ", 2)[1] if header.startswith(b"HTTP/") else b"?"
        if status != b"200":
            raise RuntimeError(f"webhook answered {status.decode(errors='replace')}: {text[:200]!r}")
        root = ET.fromstring(text)
        stream = root.find("./Connect/Stream")
        if stream is None or not stream.get("url"):
            raise RuntimeError("TwiML has no <Connect><Stream>")
        parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return str(stream.get("url")), parameters

    # ---- every 20 ms ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        ws = self.ws
        if ws is None or self.closed or self.hanging_up:
            return
        # Speaker: whatever started on an earlier tick has finished playing by now.
        marks = self.pending_marks
        while marks and marks[0][0] <= self.play_pos:
            self._echo(marks.popleft()[1])
        played = FRAME_BYTES if self.buffered >= FRAME_BYTES else self.buffered
        self.buffered -= played
        self.play_pos += played
        # Microphone.
        self._converse(now)
        speech = self.speech
        if speech is not None:
            frame = speech[self.speech_pos : self.speech_pos + FRAME_BYTES]
            self.speech_pos += FRAME_BYTES
            if len(frame) < FRAME_BYTES:
                frame += SILENCE[len(frame) :]
            if self.speech_pos >= len(speech):
                self.speech = None
                self._utterance_done(now)
        else:
            frame = SILENCE
        self.frames_sent += 1
        marker = markers.encode(markers.UP_MAGIC, self.tag, self.frames_sent, markers.now_us())
        payload = binascii.b2a_base64(marker + frame[markers.MARKER_LEN :], newline=False).decode()
        if self.twilio:
            self.seq += 1
            fs = self.frames_sent
            ws.send_text(
                f'{{"event":"media","sequenceNumber":"{self.seq}","media":{{"track":"inbound","chunk":"{fs}",'
                f'"timestamp":"{(fs - 1) * 20}","payload":"{payload}"}},"streamSid":"{self.stream_sid}"}}'
            )
        else:
            ws.send_text('{"type":"input_audio_buffer.append","audio":"' + payload + '"}')

    def _converse(self, now: float) -> None:
        """Talk, wait for the answer (maybe barging in), pause, talk again; quiet before hanging up."""
        state = self.state
        if state == "wait":
            if now >= self.next_speech_at and now < self.gen.quiet_after:
                self._speak(barge=False)
        elif state == "reply":
            heard = self.play_pos - self.reply_from
            if self.barge_at_ms is not None and heard >= self.barge_at_ms * 8:
                if now < self.gen.quiet_after:
                    self.barge_ins += 1
                    self._speak(barge=True)
                    return
            quiet = now - self.last_media_at > 0.4
            answered = self.recv_pos > self.reply_from
            if (self.buffered == 0 and quiet and answered) or now - self.reply_wait_since > 10.0:
                self.state = "wait"
                self.next_speech_at = now + self.rng.uniform(0.5, 3.0)

    def _speak(self, barge: bool) -> None:
        self.speech = self.gen.speech[self.rng.randrange(len(self.gen.speech))]
        self.speech_pos = 0
        self.state = "speaking"
        self.utterances += 1
        self.barge_at_ms = None

    def _utterance_done(self, now: float) -> None:
        self.state = "reply"
        self.reply_from = self.recv_pos
        self.reply_wait_since = now
        self.barge_at_ms = self.rng.randint(500, 1500) if self.rng.random() < self.gen.cfg.barge_in else None

    def _echo(self, name: str) -> None:
        assert self.ws is not None
        self.seq += 1
        self.ws.send_text(
            f'{{"event":"mark","sequenceNumber":"{self.seq}","streamSid":"{self.stream_sid}",'
            f'"mark":{{"name":"{name}"}}}}'
        )
        self.marks_echoed += 1

    # ---- what arrives ----------------------------------------------------------------------

    def _audio(self, payload: str | None) -> None:
        if not isinstance(payload, str):
            self.error = self.error or "audio without a string payload"
            return
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            self.error = self.error or "audio payload is not base64"
            return
        arrived = markers.now_us()
        found = markers.decode(markers.DOWN_MAGIC, audio)
        self.deltas += 1
        if found is None:
            self.down_unmarked += 1
        else:
            call, seq, stamp = found
            if call != self.tag and call != markers.NO_CALL:
                self.crosstalk += 1
            if seq <= self.down_last_seq:
                self.down_reordered += 1
            elif self.down_last_seq >= 0 and seq > self.down_last_seq + 1:
                self.down_gaps += seq - self.down_last_seq - 1
            self.down_last_seq = max(seq, self.down_last_seq)
            self.last_stamp_us = stamp
            pairs = self.gen.stats.down_pairs
            pairs.append(stamp)
            pairs.append(arrived)
        self.buffered += len(audio)
        self.recv_pos += len(audio)
        self.down_bytes += len(audio)
        self.last_media_at = time.monotonic()

    def on_twilio(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            event = msg["event"]
            if msg.get("streamSid") != self.stream_sid:
                self.crosstalk += 1
                return
            if event == "media":
                self._audio(msg["media"].get("payload"))
            elif event == "mark":
                self.marks_in += 1
                self.pending_marks.append((self.recv_pos, msg["mark"]["name"]))
                if self.last_stamp_us:
                    pairs = self.gen.stats.mark_pairs
                    pairs.append(self.last_stamp_us)
                    pairs.append(markers.now_us())
            elif event == "clear":
                self.clears.append(time.monotonic())
                self.buffered = 0
                self.play_pos = self.recv_pos
                names = [name for _, name in self.pending_marks]
                self.pending_marks.clear()
                if not self.hanging_up:
                    for name in names:
                        self._echo(name)
            else:
                self.unknown_events += 1
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            self.error = self.error or f"bad message from the relay: {exc!r}"

    def on_realtime(self, data: bytes) -> None:
        head = data[:120]
        if AUDIO_DELTA_TYPES[0] in head or AUDIO_DELTA_TYPES[1] in head:
            try:
                self._audio(orjson.loads(data).get("delta"))
            except orjson.JSONDecodeError:
                self.error = self.error or "bad JSON from the simulator"
        elif b'"type":"error"' in head:
            self.unknown_events += 1

    def on_close(self, code: int | None) -> None:
        self.closed = True
        self.close_code = code
        if not self.hanging_up:
            self.error = self.error or f"closed by the far end ({code})"

    def hangup(self) -> None:
        ws = self.ws
        if ws is None or self.closed:
            return
        self.hanging_up = True
        if self.twilio:
            self.seq += 1
            ws.send_text(
                orjson.dumps(
                    {
                        "event": "stop",
                        "sequenceNumber": str(self.seq),
                        "streamSid": self.stream_sid,
                        "stop": {"accountSid": ACCOUNT_SID, "callSid": self.call_sid},
                    }
                ).decode()
            )
        ws.close(1000)

    def summary(self) -> dict[str, Any]:
        return {
            "index": self.tag,
            "call_sid": self.call_sid,
            "error": self.error,
            "close_code": self.close_code,
            "frames_sent": self.frames_sent,
            "utterances": self.utterances,
            "barge_ins": self.barge_ins,
            "deltas": self.deltas,
            "down_bytes": self.down_bytes,
            "down_unmarked": self.down_unmarked,
            "down_gaps": self.down_gaps,
            "down_reordered": self.down_reordered,
            "down_last_seq": self.down_last_seq,
            "crosstalk": self.crosstalk,
            "marks_in": self.marks_in,
            "marks_echoed": self.marks_echoed,
            "clears": self.clears,
            "unknown_events": self.unknown_events,
        }
