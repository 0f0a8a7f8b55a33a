"""SIP mode: OpenAI's SIP connector answers the phone, the relay controls the call.

A SIP trunk (Twilio Elastic SIP Trunking, any provider) sends the call to
``sip:<project-id>@sip.api.openai.com;transport=tls``; OpenAI posts a signed
``realtime.call.incoming`` webhook to ``/openai/webhook`` (relay/app.py). The relay picks the
profile (``headers``), accepts or rejects the call through OpenAI's REST API (``calls``) and runs
it over the sideband WebSocket (relay/transport/sideband.py) on the same call core as a Media
Stream, with no audio passing through the relay (/work/shared/PROTOCOLS.md §14, §15).
"""
