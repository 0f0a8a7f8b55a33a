"""State layer: per-call records, caller memory and one-time claims, off the audio path.

`make_store` picks the backend from the configuration: Redis when a URL is given (shared by
all instances), otherwise an in-process store that only works for a single instance.
"""

from __future__ import annotations

import logging

from .base import CallRecord, Store, StoreUnavailable, caller_memory_refusal, hash_number, normalize_number
from .memory import MemoryStore
from .redis import RedisStore

__all__ = [
    "CallRecord",
    "MemoryStore",
    "RedisStore",
    "Store",
    "StoreUnavailable",
    "caller_memory_refusal",
    "hash_number",
    "make_store",
    "normalize_number",
]


def make_store(
    redis_url: str | None,
    *,
    prefix: str = "relay:",
    state_ttl_s: int = 7 * 24 * 3600,
    caller_memory_ttl_s: int = 30 * 24 * 3600,
    queue_size: int = 10_000,
    caller_key_secret: bytes,
    logger: logging.Logger | None = None,
) -> Store:
    """Build the configured store without connecting (start-up must not wait on Redis).

    Without a URL the state lives in this process only, which silently breaks call control and
    caller memory across instances, so that choice is logged once, loudly, here.
    """
    log = logger or logging.getLogger("relay.store")
    if not redis_url:
        log.warning(
            "REDIS_URL is not set: using the in-process store; state is per-process, so run a single instance only"
        )
        return MemoryStore(
            state_ttl_s=state_ttl_s,
            caller_memory_ttl_s=caller_memory_ttl_s,
            caller_key_secret=caller_key_secret,
            logger=log,
        )
    return RedisStore(
        redis_url,
        prefix=prefix,
        state_ttl_s=state_ttl_s,
        caller_memory_ttl_s=caller_memory_ttl_s,
        queue_size=queue_size,
        caller_key_secret=caller_key_secret,
        logger=log,
    )
