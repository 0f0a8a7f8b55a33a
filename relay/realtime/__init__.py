"""OpenAI Realtime wire formats. Everything dialect-specific (GA vs beta) lives in dialect.py.

Nothing is imported here, so ``relay.config`` and ``relay.agent_settings`` can use
``relay.realtime.models`` without a cycle (``dialect`` itself imports ``relay.agent_settings``).
"""
