"""Every use of uvicorn's non-public API in the relay, in one package; the rest of relay/ uses only
``uvicorn.Config``, ``uvicorn.Server.run``/``serve`` and these modules.

Versions: written against uvicorn 0.54.0 and checked with 0.53.0 and 0.54.0 (the test suite runs on
0.54.0; every uvicorn source file named below is identical in 0.53.0). pyproject.toml allows
``>=0.53,<0.55``. The sans-I/O WebSocket protocol first has ``disconnected`` and ``close_timer`` in
0.52.1; 0.53 is the lower bound because 0.52's httptools protocol decides keep-alive differently
(it ignores the parser's ``should_keep_alive()`` and ``Connection`` header lists), which the idle
bound of `http_limits` builds on.

What each module relies on:

- `server` (uvicorn/server.py, uvicorn/config.py, uvicorn/_subprocess.py): ``Server.handle_exit(sig,
  frame)`` is the handler ``Server.capture_signals()`` installs for SIGINT/SIGTERM, and it sets
  ``should_exit`` (then ``force_exit``); ``should_exit`` ends ``main_loop()`` and starts the graceful
  shutdown, ``force_exit`` cuts it short; ``started`` turns True once the sockets listen;
  ``capture_signals()`` is a context manager around ``serve()``; ``Config.bind_socket()``;
  ``_subprocess.get_subprocess(config, target, sockets)`` returns an unstarted spawn process.
- `websocket_protocol` (uvicorn/protocols/websockets/websockets_sansio_impl.py):
  ``WebSocketsSansIOProtocol`` and its attributes ``queue`` (used only through ``put_nowait``,
  ``get``, ``empty``, ``qsize``), ``frames`` and ``curr_msg_data_type`` (the message being
  assembled), ``read_paused``, ``close_sent``, ``close_timer``, ``disconnected``,
  ``handshake_complete``, ``writable`` (an asyncio.Event cleared while the transport is over its
  high-water mark), ``conn`` (websockets' sans-I/O ``ServerProtocol``), ``transport``, ``loop``,
  ``logger``; ``handle_connect(event)`` sets ``scope`` only when the handshake is accepted;
  ``send_receive_event_to_app()`` is called once per complete message; ``handle_parser_exception()``
  after a close frame has been queued; ``receive()`` is the ASGI receive.
- `http_limits` (uvicorn/protocols/http/httptools_impl.py): ``HttpToolsProtocol.data_received`` is
  copied there with the head bounds added, so it must match uvicorn's line for line; it also uses
  ``parser``, ``url``, ``pipeline``, ``cycle`` (``response_complete``), ``logger``, ``loop``,
  ``transport``, the parser callbacks ``on_url``, ``on_headers_complete``, ``on_message_complete``,
  ``on_response_complete``, and ``_unset_keepalive_if_required``, ``_should_upgrade``,
  ``_unsupported_upgrade_warning``, ``handle_websocket_upgrade``, ``send_400_response``; the protocol
  is built as ``http(config=config, ...)`` and an attribute set on the Config survives pickling.
- `proxy_headers` (uvicorn/middleware/proxy_headers.py): ``ProxyHeadersMiddleware(app,
  trusted_hosts=...)`` rewrites scheme and client from X-Forwarded-Proto/-For for trusted peers,
  leaves the headers in place, and matches peers in their IPv4 form only (relay/forwarded.py maps
  ``::ffff:a.b.c.d`` first).

On upgrade: diff the files named above between the two releases (``pip download uvicorn==X
--no-deps``), re-copy ``data_received`` if it changed, run tests/test_direct_paths.py
tests/test_exposure.py tests/test_drain.py tests/test_relay_e2e.py, then move the bound in
pyproject.toml and the versions here together (tests/test_static.py checks that they agree).
"""
