"""Relay between Twilio Media Streams phone calls and the OpenAI Realtime API."""

__version__ = "0.1.0"
