"""Who calls whom: the account, numbers and call sid of a simulated call, and where the relay listens.

``base_url`` is where the relay really listens; ``public_url`` is where Twilio believes it does
(the URL the webhook signature covers, /work/shared/PROTOCOLS.md §2), as behind a proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.sim.ulaw import FRAME_MS

DEFAULT_ACCOUNT_SID = "AC" + "5ca1ab1e" * 4


@dataclass
class CallerConfig:
    """Who calls whom, and where the relay really listens versus where Twilio thinks it does."""

    base_url: str
    auth_token: str
    public_url: str | None = None
    account_sid: str = DEFAULT_ACCOUNT_SID
    from_number: str = "+15550001111"
    to_number: str = "+15550002222"
    call_sid: str | None = None
    sign_upgrade: bool = True
    frame_ms: int = FRAME_MS
    extra_form: dict[str, str] = field(default_factory=dict)
    # False for load runs: heard, sent_payloads and received_payloads grow by ~30 kB per
    # call-second, so they stay empty; counters, events and timings are kept either way.
    keep_audio: bool = True

    def __post_init__(self) -> None:
        if self.frame_ms <= 0:
            raise ValueError("frame_ms must be positive")

    @property
    def public_base(self) -> str:
        """The relay's origin as Twilio sees it, without a trailing slash."""
        return (self.public_url or self.base_url).rstrip("/")
