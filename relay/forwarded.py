"""X-Forwarded-* headers count only when they come from a trusted proxy (``FORWARDED_ALLOW_IPS``).

The webhook builds the stream URL it hands Twilio from the request's scheme and host, so a client
that could choose them could point a call's audio at any server. uvicorn's proxy-headers
middleware applies X-Forwarded-Proto and X-Forwarded-For from trusted peers but leaves the
headers in place, and it does not handle X-Forwarded-Host at all. `ForwardedHeaders` wraps it:
a request from a trusted peer goes through uvicorn's middleware with its headers as sent
(X-Forwarded-Host included); from any other peer every X-Forwarded-* header is removed before
the app sees the request.

``FORWARDED_ALLOW_IPS`` is a comma-separated list of IP addresses, CIDR networks, ``*`` (any
peer) or other literals (matched exactly, e.g. a Unix socket path), as uvicorn reads it.
"""

from __future__ import annotations

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from relay.uvicorn_internals.proxy_headers import proxy_headers

FORWARDED_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port"})


class TrustedProxies:
    """``peer in proxies``: is this peer address one whose forwarding headers are believed?"""

    def __init__(self, spec: str) -> None:
        items = [item.strip() for item in spec.split(",") if item.strip()]
        self.any = "*" in items
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.literals: set[str] = set()
        for item in items:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.literals.add(item)

    def __contains__(self, peer: object) -> bool:
        if self.any:
            return True
        if not isinstance(peer, str) or not peer:
            return False
        if peer in self.literals:
            return True
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d: it is the same peer.
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return any(address in network or (mapped is not None and mapped in network) for network in self.networks)


def _ipv4_mapped(peer: str) -> str | None:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return None if mapped is None else str(mapped)


class ForwardedHeaders:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, trusted: str) -> None:
        self.app = app
        self.trusted = TrustedProxies(trusted)
        self.proxied = proxy_headers(app, trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if client and client[0] in self.trusted:
            mapped = _ipv4_mapped(client[0])
            if mapped is not None:  # uvicorn's own check knows only the IPv4 form
                scope = {**scope, "client": (mapped, client[1])}
            await self.proxied(scope, receive, send)
            return
        headers = scope["headers"]
        if any(name in FORWARDED_HEADERS for name, _ in headers):
            scope = {**scope, "headers": [(name, value) for name, value in headers if name not in FORWARDED_HEADERS]}
        await self.app(scope, receive, send)
