"""G.711 µ-law audio as it crosses the relay: sizes and durations of base64 payloads.

Twilio sends 8 kHz µ-law, one byte per sample (8 bytes per ms), in 20 ms frames; the Realtime
session is configured for the same format in both directions, so audio is never decoded here,
only measured.
"""

from __future__ import annotations

ULAW_BYTES_PER_MS = 8
FRAME_MS = 20
FRAME_BYTES = FRAME_MS * ULAW_BYTES_PER_MS


def audio_bytes(payload: str) -> int:
    """Exact length of the audio in a base64 payload, without decoding it.

    A 20 ms frame is 160 bytes in 216 characters, two of them padding: counting ``len * 3 / 4``
    would drift 2 bytes a frame (0.75 s a minute of playback or replay accounting).
    """
    n = len(payload) * 3 // 4
    if payload[-1:] == "=":
        n -= 2 if payload[-2:] == "==" else 1
    return n
