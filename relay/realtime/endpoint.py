"""Where a Realtime session connects and how it authenticates, per provider and dialect.

- openai (ga or beta): ``OPENAI_REALTIME_URL?model=<model>``, ``Authorization: Bearer <OPENAI_API_KEY>``.
- azure, ga: ``<endpoint>/openai/v1/realtime?model=<deployment>``.
- azure, beta (preview): ``<endpoint>/openai/realtime?api-version=<version>&deployment=<deployment>``.
- azure auth, both forms: ``api-key: <AZURE_OPENAI_API_KEY>``, else ``Authorization: Bearer <Entra token>``.

The beta dialect adds ``OpenAI-Beta: realtime=v1`` (``Dialect.headers``), on Azure too, as the
``openai`` package's beta client does; GA sends no such header.
"""

from __future__ import annotations

from urllib.parse import urlencode

from relay.config import Settings
from relay.realtime.dialect import Dialect

OFFLINE_KEY = "offline-simulator"
"""Sent when no key is configured; start-up allows that only for a loopback simulator."""


def _ws_scheme(url: str) -> str:
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            return ws + url[len(http) :]
    return url


def realtime_url(settings: Settings, model: str) -> str:
    """The WebSocket URL of one session using ``model`` (on Azure: a deployment name)."""
    if settings.provider == "azure":
        base = _ws_scheme(settings.azure_endpoint or "")
        if settings.dialect == "ga":
            return f"{base}/openai/v1/realtime?{urlencode({'model': model})}"
        query = urlencode({"api-version": settings.azure_api_version, "deployment": model})
        return f"{base}/openai/realtime?{query}"
    sep = "&" if "?" in settings.realtime_url else "?"
    return f"{settings.realtime_url}{sep}{urlencode({'model': model})}"


def auth_headers(settings: Settings) -> dict[str, str]:
    if settings.provider == "azure":
        if settings.azure_api_key:
            return {"api-key": settings.azure_api_key}
        return {"Authorization": f"Bearer {settings.azure_ad_token or OFFLINE_KEY}"}
    return {"Authorization": f"Bearer {settings.openai_api_key or OFFLINE_KEY}"}


def connect_target(settings: Settings, dialect: Dialect, model: str) -> tuple[str, dict[str, str]]:
    """URL and handshake headers for one Realtime connection."""
    return realtime_url(settings, model), dialect.headers(auth_headers(settings))


def sideband_target(settings: Settings, dialect: Dialect, call_id: str) -> tuple[str, dict[str, str]]:
    """URL and handshake headers of a SIP call's sideband connection: ``?call_id=…`` and no model
    (the call's session was configured by its accept), authenticated as any Realtime connection."""
    if settings.provider == "azure":
        base = f"{_ws_scheme(settings.azure_endpoint or '')}/openai/v1/realtime"
    else:
        base = settings.realtime_url
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}{urlencode({'call_id': call_id})}", dialect.headers(auth_headers(settings))
