"""G.711 µ-law in pure Python: the audio format Twilio and the relay speak.

The simulators need to look at (VAD) and produce (synthetic speech) µ-law audio without numpy or the
removed ``audioop`` module, so everything here is table driven and built once at import.
"""

from __future__ import annotations

import math
import random
import struct
import sys
import wave
from array import array
from collections.abc import Iterable
from pathlib import Path

from relay.endpointing import ULAW_TO_LINEAR, frame_square_sum

ULAW_BYTES_PER_MS = 8
"""8000 samples/s, one byte each."""
SAMPLE_RATE_HZ = 8000
FRAME_MS = 20
"""One Twilio media frame."""
FRAME_BYTES = FRAME_MS * ULAW_BYTES_PER_MS
SILENCE_BYTE = 0xFF
"""µ-law code of linear 0 (0x7F is the other, "negative zero")."""

_BIAS = 0x84
_CLIP = 32635
_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_MULAW = 7
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


def _build_encode_table() -> bytes:
    """Code for every int16 (indexed by ``sample & 0xFFFF``), built segment by segment, not per sample."""
    by_biased = bytearray()  # index b - 128 for biased magnitudes b in [128, 32768)
    for exponent in range(8):
        for mantissa in range(16):
            width = 1 << (exponent + 3)
            by_biased += bytes([~((exponent << 4) | mantissa) & 0xFF]) * width
    by_magnitude = bytearray(by_biased[_BIAS - 128 : _BIAS - 128 + _CLIP + 1])
    by_magnitude += by_magnitude[-1:] * (32769 - len(by_magnitude))  # clip up to |-32768|
    positive = bytes(by_magnitude[:32768])
    set_sign = bytes(code & 0x7F for code in range(256))
    negative = bytes(by_magnitude[32768:0:-1]).translate(set_sign)  # -32768 .. -1
    return positive + negative


_DECODE = ULAW_TO_LINEAR  # the relay's own G.711 expansion table (relay/endpointing.py)
_ENCODE: bytes = _build_encode_table()


def _alaw_of(sample: int) -> int:
    """G.711 A-law code of a linear PCM16 value (13-bit magnitude, 8 segments, even bits inverted)."""
    sign = 0x80 if sample >= 0 else 0x00
    magnitude = (sample if sample >= 0 else ~sample) >> 3  # negatives: one's complement, as in G.711
    segment = 0 if magnitude < 32 else magnitude.bit_length() - 5
    mantissa = (magnitude >> max(segment, 1)) & 0x0F
    return (sign | (segment << 4) | mantissa) ^ 0x55


_TO_ALAW: bytes = bytes(_alaw_of(value) for value in _DECODE)
_TO_PCM24K: tuple[bytes, ...] = tuple(struct.pack("<hhh", value, value, value) for value in _DECODE)


def to_alaw(data: bytes) -> bytes:
    """µ-law bytes as G.711 A-law (``audio/pcma``, ``g711_alaw``), same rate and length."""
    return data.translate(_TO_ALAW)


def to_pcm16_24k(data: bytes) -> bytes:
    """µ-law bytes as little-endian PCM16 at 24 kHz (``audio/pcm``, ``pcm16``): each sample held 3 times."""
    table = _TO_PCM24K
    return b"".join([table[code] for code in data])


def decode(data: bytes) -> list[int]:
    """µ-law bytes to linear PCM16 sample values."""
    table = _DECODE
    return [table[code] for code in data]


def encode(samples: Iterable[int]) -> bytes:
    """Linear PCM16 sample values (clipped to int16) to µ-law bytes."""
    table = _ENCODE
    return bytes(table[(s if -32768 <= s <= 32767 else (32767 if s > 0 else -32768)) & 0xFFFF] for s in samples)


def rms(data: bytes) -> float:
    """Root mean square of the decoded signal; a table lookup per byte so VAD stays cheap."""
    if not data:
        return 0.0
    return math.sqrt(frame_square_sum(data) / len(data))


def square_sum(data: bytes) -> int:
    """Sum of squared linear values: lets callers combine windows without re-reading bytes."""
    return frame_square_sum(data)


def ms_of(data: bytes) -> int:
    """Whole milliseconds of µ-law audio in ``data``."""
    return len(data) // ULAW_BYTES_PER_MS


def silence(ms: int) -> bytes:
    """Digital silence of the given length."""
    return bytes([SILENCE_BYTE]) * (max(0, ms) * ULAW_BYTES_PER_MS)


def tone(ms: int, hz: float, level: float) -> bytes:
    """A pure sine at ``level`` (fraction of full scale)."""
    n = max(0, ms) * ULAW_BYTES_PER_MS
    amplitude = level * 32767.0
    step = 2.0 * math.pi * hz / SAMPLE_RATE_HZ
    return encode(int(amplitude * math.sin(step * i)) for i in range(n))


_HARMONICS: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 0.55), (3, 0.35), (4, 0.2), (5, 0.1))


def synth_speech(ms: int, *, seed: int = 0, pitch_hz: float = 140.0, level: float = 0.3) -> bytes:
    """Voice-like audio: a gliding fundamental with harmonics under a syllable-rate envelope.

    The envelope never drops below ~45 % so every 20 ms window stays well above an energy VAD
    threshold (RMS of several thousand at the default level), while still sounding like speech.
    """
    n = max(0, ms) * ULAW_BYTES_PER_MS
    rng = random.Random(seed)
    syllable_hz = rng.uniform(3.0, 5.0)
    glide_phase = rng.uniform(0.0, 2.0 * math.pi)
    envelope_phase = rng.uniform(0.0, math.pi)
    phases = [rng.uniform(0.0, 2.0 * math.pi) for _ in _HARMONICS]
    scale = level * 32767.0 / sum(amp for _, amp in _HARMONICS)
    two_pi = 2.0 * math.pi
    fade_in = 3 * ULAW_BYTES_PER_MS
    sin = math.sin
    samples: list[int] = []
    phase = 0.0
    for i in range(n):
        t = i / SAMPLE_RATE_HZ
        f0 = pitch_hz * (1.0 + 0.06 * sin(two_pi * 0.8 * t + glide_phase))
        phase += two_pi * f0 / SAMPLE_RATE_HZ
        envelope = 0.45 + 0.55 * sin(math.pi * syllable_hz * t + envelope_phase) ** 2
        if i < fade_in:
            envelope *= i / fade_in
        value = 0.0
        for (k, amp), ph in zip(_HARMONICS, phases, strict=True):
            value += amp * sin(k * phase + ph)
        samples.append(int(scale * envelope * value))
    return encode(samples)


def write_wav(path: str | Path, ulaw_bytes: bytes) -> None:
    """Write 16-bit PCM 8 kHz mono (what every audio player opens) decoded from µ-law."""
    pcm = array("h", decode(ulaw_bytes))
    if sys.byteorder == "big":
        pcm.byteswap()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE_HZ)
        out.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> bytes:
    """µ-law bytes from an 8 kHz mono WAV holding 16-bit PCM or µ-law (format tag 7).

    Parsed by hand because the stdlib ``wave`` reader refuses µ-law. No resampling: anything else
    raises ``ValueError`` naming what was found.
    """
    raw = Path(path).read_bytes()
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    data: bytes | None = None
    pos = 12
    while pos + 8 <= len(raw):
        chunk_id = raw[pos : pos + 4]
        (size,) = struct.unpack_from("<I", raw, pos + 4)
        body = raw[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise ValueError(f"{path}: truncated fmt chunk")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                (tag,) = struct.unpack_from("<H", body, 24)  # first two bytes of the sub-format GUID
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise ValueError(f"{path}: missing fmt or data chunk")
    tag, channels, rate, bits = fmt
    if channels != 1 or rate != SAMPLE_RATE_HZ:
        raise ValueError(f"{path}: need 8000 Hz mono, found {rate} Hz with {channels} channels (no resampling)")
    if tag == _WAVE_FORMAT_MULAW and bits == 8:
        return bytes(data)
    if tag == _WAVE_FORMAT_PCM and bits == 16:
        pcm = array("h")
        pcm.frombytes(data[: len(data) - len(data) % 2])
        if sys.byteorder == "big":
            pcm.byteswap()
        return encode(pcm)
    raise ValueError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits); need 16-bit PCM or µ-law")
