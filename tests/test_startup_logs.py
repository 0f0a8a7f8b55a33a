"""What `python -m relay serve` tells the operator at start-up: JSON lines only (from the first one,
with one or several workers), a loud RELAY_INSECURE_DEV warning, and Redis unreachable at start."""

from __future__ import annotations

import logging
import signal
from typing import Any

import pytest
from conftest import RedisProcess, relay_settings, wait_for
from ops_support import RelayProcess

from relay.runtime import Runtime, redis_location

NO_REALTIME = "ws://127.0.0.1:9"  # no call is made in these tests
NO_TOOLS = "handler module relay.twilio.twiml defines no @tool functions"
INSECURE = (
    "RELAY_INSECURE_DEV=1, for local development only: Twilio signature checks on /incoming-call are disabled "
    "(no TWILIO_AUTH_TOKEN); media stream tokens are signed with a publicly known development secret"
)


def messages(relay: RelayProcess, text: str) -> list[dict[str, Any]]:
    return [line for line in relay.lines if text in line["msg"]]


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_line_of_a_start_and_stop_is_json(workers: int) -> None:
    # a handler module without tools: its warning comes while the configuration is checked,
    # before any worker (and before the workers' own logging) exists
    env = {"WEB_CONCURRENCY": str(workers), "RELAY_HANDLERS": "handlers.call_control,relay.twilio.twiml"}
    relay = RelayProcess(NO_REALTIME, **env)
    try:
        await relay.start()
        assert await wait_for(lambda: len(messages(relay, "relay worker starting")) == workers, timeout=10)
        # each worker's signal handlers are installed once its application has started
        assert await wait_for(lambda: len(messages(relay, "Application startup complete.")) == workers, timeout=10)
        relay.signal(signal.SIGTERM)
        assert await relay.wait(20) == 0
        lines = relay.lines  # raises on any line that is not one JSON object
        assert relay.stderr == []
        assert lines[0]["msg"] == NO_TOOLS and lines[0]["level"] == "warning"
        assert len(messages(relay, NO_TOOLS)) == 1 + workers  # the check before start-up, then each worker
        assert len(messages(relay, "Application shutdown complete.")) == workers
    finally:
        await relay.close()


async def test_insecure_dev_warns_at_start_and_readyz_says_so() -> None:
    relay = RelayProcess(NO_REALTIME, RELAY_INSECURE_DEV="1", TWILIO_AUTH_TOKEN="", RELAY_STREAM_SECRET="")
    secure = RelayProcess(NO_REALTIME)
    try:
        await relay.start()
        await secure.start()
        assert await wait_for(lambda: messages(relay, "RELAY_INSECURE_DEV") != [], timeout=5)
        (warning,) = messages(relay, "RELAY_INSECURE_DEV")
        assert warning["level"] == "warning" and warning["msg"] == INSECURE
        ready = await relay.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["insecure_dev"] is True and ready.json()["warning"] == INSECURE
        secure_ready = (await secure.get("/readyz")).json()
        assert secure_ready["insecure_dev"] is False and "warning" not in secure_ready
        assert messages(secure, "RELAY_INSECURE_DEV") == []
    finally:
        await relay.close()
        await secure.close()


async def test_the_insecure_dev_warning_is_repeated(caplog: pytest.LogCaptureFixture) -> None:
    settings = relay_settings(NO_REALTIME, insecure_dev=True)
    runtime = Runtime(settings)
    runtime.insecure_warning_interval_s = 0.5  # production: every five minutes
    with caplog.at_level(logging.WARNING, logger="relay.runtime"):
        await runtime.start()
        try:

            def repeated() -> list[str]:
                return [r.getMessage() for r in caplog.records if "RELAY_INSECURE_DEV" in r.getMessage()]

            assert await wait_for(lambda: len(repeated()) >= 2, timeout=5)
        finally:
            await runtime.stop()
    # the auth token and stream secret are set here: what remains is the start-up leniency
    assert repeated()[0] == (
        "RELAY_INSECURE_DEV=1, for local development only: start-up would not insist on TWILIO_AUTH_TOKEN"
    )


async def test_redis_unreachable_at_start_is_one_warning_then_one_line_when_it_answers() -> None:
    redis_server = RedisProcess()
    redis_server.kill()  # the port is known and closed
    port = redis_server.port
    relay = RelayProcess(NO_REALTIME, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    try:
        await relay.start()
        assert await wait_for(lambda: messages(relay, "unreachable") != [], timeout=10)
        assert (await relay.get("/readyz")).status_code == 503
        redis_server.start()
        assert await wait_for(lambda: messages(relay, "reachable again") != [], timeout=10)
        (down,) = messages(relay, "unreachable")
        assert down["level"] == "warning"
        assert down["msg"] == (
            f"redis at 127.0.0.1:{port} is unreachable: caller memory, call state and GET /calls are degraded "
            "and /readyz answers 503 until it answers"
        )
        (up,) = messages(relay, "reachable again")
        assert up["level"] == "info" and up["msg"].startswith(f"redis at 127.0.0.1:{port} is reachable again after ")
    finally:
        await relay.close()
        redis_server.stop()


def test_the_redis_location_in_log_lines_never_has_the_password() -> None:
    assert redis_location("rediss://default:hunter2-secret@cache.internal:6380/2") == "cache.internal:6380"
    assert redis_location("redis://:hunter2-secret@[::1]/0") == "[::1]:6379"
    assert redis_location("unix:///run/redis.sock?db=1") == "/run/redis.sock"
