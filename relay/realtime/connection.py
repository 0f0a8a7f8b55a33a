"""The Realtime WebSocket's connection class, under the name the transport imports.

It hooks websockets' event processing, so it is defined with the relay's other uses of websockets'
internals, in relay/websockets_internals.py.
"""

from relay.websockets_internals import RealtimeConnection

__all__ = ["RealtimeConnection"]
