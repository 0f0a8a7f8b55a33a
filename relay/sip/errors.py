"""What SIP mode's REST client reports to the rest of the relay, without the ``openai`` package: it
is only loaded when SIP mode is on (it costs about 36 MB and 0.7 s of start-up)."""

from __future__ import annotations


class CallGone(Exception):
    """The call is no longer there to act on (OpenAI answered 404: the caller hung up)."""


class WebhookSignatureInvalid(ValueError):
    """The project webhook's signature does not match, or its timestamp is outside the tolerance."""
