"""Latency markers hidden in µ-law audio, readable by any process on this machine.

A marker is 28 bytes at the start of a frame or chunk: a 6-byte magic, then the call index (16 bits),
a sequence number (24 bits) and a ``CLOCK_MONOTONIC`` time in µs (48 bits), one hex digit per byte.
Every byte is a µ-law code between 0xF0 and 0xFF, i.e. a sample of magnitude 0..120 out of 32767:
inaudible, and far below any VAD threshold, so a marked frame of silence still counts as silence
and a marked frame of speech still counts as speech. ``time.monotonic()`` is the same clock in
every process on Linux, so a stamp written by one process can be subtracted in another.
"""

from __future__ import annotations

import time

MARKER_LEN = 28
UP_MAGIC = bytes((0xF1, 0xF7, 0xF3, 0xFE, 0xF2, 0xFB))
"""Caller -> relay -> Realtime (frames of caller audio)."""
DOWN_MAGIC = bytes((0xFB, 0xF2, 0xFE, 0xF3, 0xF7, 0xF1))
"""Realtime -> relay -> caller (chunks of assistant audio)."""
NO_CALL = 0xFFFF
_TIME_MASK = (1 << 48) - 1
_HEX = b"0123456789abcdef"
_QUIET = bytes(0xF0 | v for v in range(16))
_TO_QUIET = bytes.maketrans(_HEX, _QUIET)
_FROM_QUIET = bytes.maketrans(_QUIET, _HEX)


def now_us() -> int:
    return int(time.monotonic() * 1_000_000) & _TIME_MASK


def encode(magic: bytes, call: int, seq: int, t_us: int) -> bytes:
    digits = b"%04x%06x%012x" % (call & 0xFFFF, seq & 0xFFFFFF, t_us & _TIME_MASK)
    return magic + digits.translate(_TO_QUIET)


def decode(magic: bytes, data: bytes) -> tuple[int, int, int] | None:
    """(call, seq, t_us) if ``data`` starts with a marker of that kind."""
    if len(data) < MARKER_LEN or data[:6] != magic:
        return None
    digits = data[6:MARKER_LEN].translate(_FROM_QUIET)
    try:
        return int(digits[:4], 16), int(digits[4:10], 16), int(digits[10:], 16)
    except ValueError:
        return None


def elapsed_ms(t_us: int, now: int | None = None) -> float:
    """ms from a stamp to now (or ``now``), modulo the 48-bit wrap."""
    current = now_us() if now is None else now
    return ((current - t_us) & _TIME_MASK) / 1000.0
