"""OpenAI Realtime wire formats. Everything dialect-specific (GA vs beta) lives in dialect.py."""

from relay.realtime.dialect import Dialect, get_dialect

__all__ = ["Dialect", "get_dialect"]
