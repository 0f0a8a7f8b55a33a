"""Offline stand-ins for the relay's peers (OpenAI Realtime server, callers) used by the demo and tests."""
