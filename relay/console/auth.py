"""The console's sign-in: signed session cookies any instance accepts, CSRF tokens tied to the
session, and the count of failed sign-ins per client address (in the store, so it holds across
instances).

A session is ``{id}.{expires}.{mac}``: a random id, its expiry (epoch s) and an HMAC-SHA256 of
both, keyed by a key derived from RELAY_CONSOLE_TOKEN. Every instance has the token, so every
instance accepts every session and nothing about sessions is stored; changing the token signs
everyone out. A form's CSRF token is an HMAC of the session id under the same key: a page from
another site cannot know it, and it is worthless without the session cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "relay_console"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SIGNIN_WINDOW_S = 15 * 60  # failed sign-ins are counted per client over this window ...
SIGNIN_MAX_FAILURES = 5  # ... and past this many the client is refused until the window ends


def _key(token: str) -> bytes:
    return hmac.new(token.encode(), b"relay console session v1", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    expires: int
    csrf: str

    @property
    def who(self) -> str:
        """The session as the audit log names it (never the cookie: its id without the MAC is useless)."""
        return f"console:{self.session_id[:12]}"


class Sessions:
    def __init__(self, token: str, ttl_s: int) -> None:
        self._token = token
        self._key = _key(token)
        self.ttl_s = ttl_s

    def token_matches(self, presented: str) -> bool:
        return hmac.compare_digest(presented.strip().encode(), self._token.encode())

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def _session(self, session_id: str, expires: int) -> Session:
        return Session(session_id, expires, self._mac(f"csrf:{session_id}"))

    def issue(self, now: float | None = None) -> tuple[str, Session]:
        """A new session: the cookie's value and the session."""
        session_id = secrets.token_hex(16)
        expires = int(now if now is not None else time.time()) + self.ttl_s
        cookie = f"{session_id}.{expires}.{self._mac(f'{session_id}.{expires}')}"
        return cookie, self._session(session_id, expires)

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None when it is missing, altered or expired."""
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        session_id, expires_text, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac(f"{session_id}.{expires_text}").encode()):
            return None
        expires = int(expires_text)
        if expires <= (now if now is not None else time.time()):
            return None
        return self._session(session_id, expires)

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(str(presented).encode(), session.csrf.encode())
