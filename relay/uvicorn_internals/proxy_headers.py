"""uvicorn's X-Forwarded-Proto/X-Forwarded-For middleware, which relay/forwarded.py applies to trusted peers.

See the package docstring for what of uvicorn this relies on.
"""

from __future__ import annotations

from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware


def proxy_headers(app: ASGIApp, trusted: str) -> ASGIApp:
    """`app` behind uvicorn's middleware, which takes the scheme and client address from
    X-Forwarded-Proto and X-Forwarded-For when the peer is in `trusted` (``FORWARDED_ALLOW_IPS`` syntax)."""
    return ProxyHeadersMiddleware(app, trusted_hosts=trusted)  # type: ignore[arg-type,return-value]
