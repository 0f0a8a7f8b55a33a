"""The Media Stream transport: a Twilio socket and a replaceable Realtime socket around one call core.

These modules move messages, run effects and own tasks and timeouts; what to do with a message is
decided by the call (relay.call) and by the caller-audio policy (relay.call.caller_audio).

- `admission`: accept, the start message, token, signature and single use.
- `lifecycle`: `MediaStreamCall`, one call from admission to teardown (tools, hang-up, transfer).
- `media_stream`: the Twilio socket's receive side, one caller frame at a time.
- `realtime_session`: the Realtime socket: connect, reconnect, roll over, read.
- `output`: the one path by which anything reaches either socket.
- `twilio_socket`: the caller's socket as it is written to and closed.
- `ending`: whether and why the call is ending, shared by the parts above.
- `live_hold`: this call's hold on being the one live stream of its call, in the store.
"""
