"""Keypad entries: key presses collected into one entry, as a caller types an account number.

An entry ends with the terminator key (``dtmf.terminator``, kept in the digits), after
``dtmf.max_digits`` keys, or when ``dtmf.timeout_ms`` pass after the last key. The timeout is
the call's only timer: the I/O layer sleeps until `Keypad.deadline` and then lets time pass
with ``Call.tick()``; a key that arrives after the deadline but before the tick first ends the
previous entry, so the outcome never depends on which of the two the event loop ran first.
If the caller hangs up mid-entry, what was typed is kept and answered by nobody.
"""

from __future__ import annotations

from typing import Any

from relay.agent_settings import DtmfSettings
from relay.call.effects import Entry, Outbox
from relay.realtime import client


class Keypad:
    """The keys of the entry being typed."""

    __slots__ = ("_keys", "_last_key_at", "_outbox", "_unsent", "settings")

    def __init__(self, outbox: Outbox, settings: DtmfSettings) -> None:
        self._outbox = outbox
        self.settings = settings
        self._keys: list[str] = []
        self._last_key_at = 0.0
        self._unsent: list[dict[str, Any]] = []  # entries typed while no session was ready

    @property
    def open(self) -> bool:
        """Some keys were typed and the entry has not ended yet."""
        return bool(self._keys)

    def deadline(self) -> float | None:
        """When the open entry ends by timeout (clock time), or None without one."""
        if self._keys:
            return self._last_key_at + self.settings.timeout_ms / 1000.0
        return None

    def expired(self, now: float) -> bool:
        """The open entry's pause is over at `now`: it has ended by timeout."""
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def press(self, digit: str, now: float) -> str | None:
        """Add one key; returns how the entry ended ("terminator", "max_digits") or None if open."""
        self._keys.append(digit)
        self._last_key_at = now
        if self.settings.terminator and digit == self.settings.terminator:
            return "terminator"
        if len(self._keys) >= self.settings.max_digits:
            return "max_digits"
        return None

    def take(self, ended: str) -> str:
        """Record the entry (how it `ended`) and return its digits; the keypad is empty afterwards."""
        digits = "".join(self._keys)
        self._keys.clear()
        self._outbox.effects.append(Entry("dtmf", {"digits": digits, "ended": ended}))
        return digits

    def tell_model(self, digits: str, *, session_ready: bool) -> None:
        """Give the model the entry as the caller's words, now or once a session is ready."""
        item = client.user_text(f"The caller entered {' '.join(digits)}")
        if session_ready:
            self._outbox.send_upstream(item)
        else:
            self._unsent.append(item)

    def send_unsent(self) -> bool:
        """A session is ready: send it the entries typed without one; True if there were any."""
        unsent = self._unsent
        for item in unsent:
            self._outbox.send_upstream(item)
        self._unsent = []
        return bool(unsent)
