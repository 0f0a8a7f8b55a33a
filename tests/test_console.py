"""The operations console at /console: sign-in, live calls across instances, one call live, stepping
in, history; in a real browser (Playwright driving Debian's Chromium) and over plain HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from conftest import API_KEY, AUTH_TOKEN, make_caller, relay_settings, wait_for
from playwright import async_api as playwright_api
from tools_support import ACCOUNT_SID, TwilioApiRecorder

from relay.agent_settings import AgentSettings
from relay.config import Settings
from relay.demo_console import DEMO_CALLS
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator

CONSOLE_TOKEN = "console-token-3b9f1c7e5a2d4f6b8c0e1a3c5e7f9b2d"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FOUND = CHROMIUM.exists()
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console"


def console_settings(realtime_url: str, **overrides: Any) -> Settings:
    return relay_settings(realtime_url, console_token=CONSOLE_TOKEN, **overrides)


class Page:
    """A Chromium page that records every console error and failed request the page has."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    assert CHROMIUM_FOUND, "the console's browser tests need Debian's chromium (.ci/run installs it)"
    async with playwright_api.async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def signed_in(browser: Any, base_url: str) -> Page:
    context = await browser.new_context(base_url=base_url)
    page = Page(await context.new_page())
    await page.page.goto("/console")
    await page.shot("signin")
    await page.page.get_by_label("Console token").fill(CONSOLE_TOKEN)
    await page.page.get_by_role("button", name="Sign in").click()
    await page.page.wait_for_url("**/console/live")
    return page


async def test_the_console_follows_a_call_on_another_instance_and_steps_in(
    sim: RealtimeSimulator, redis_url: str, store_prefix: str, browser: Any
) -> None:
    sim.config.greeting_reply_ms = 2500
    sim.config.reply_ms = 600
    settings = console_settings(sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    async with LocalRelay(settings) as carrier, LocalRelay(settings) as serving:
        page = await signed_in(browser, serving.base_url)
        assert await page.page.locator("#live-rows").inner_text() == "No calls right now."
        caller = make_caller(carrier, from_number="+15550001234")
        await caller.connect()
        started = time.monotonic()
        row = page.page.locator(f'tr[data-call="{caller.call_sid}"]')
        await row.wait_for(timeout=2000)
        assert time.monotonic() - started < 2.0
        expect = playwright_api.expect
        cells = row.locator("td")
        await expect(cells.nth(1)).to_have_text("+1••••••1234")  # once the call's record is written
        assert (await cells.all_inner_texts())[2:5] == ["inbound", "default", carrier.runtime.instance_id]
        await page.shot("live")

        await row.get_by_role("link").click()
        await page.page.wait_for_url(f"**/console/calls/{caller.call_sid}")
        transcript = page.page.locator("#transcript")
        # the greeting's transcript appears as the simulator speaks it; the caller cuts in
        assert await caller.wait_for_audio(800, timeout=5)
        caller.say(ulaw.synth_speech(600, seed=3))
        await transcript.get_by_text("Barge-in").wait_for(timeout=5000)
        await transcript.get_by_text("caller turn 1").wait_for(timeout=5000)
        barge_ins = page.page.locator("svg#timeline rect.barge-in")
        await barge_ins.first.wait_for(timeout=2000)
        assert await barge_ins.count() == 1
        assert await page.page.locator("svg#timeline rect.caller").count() == 1
        await caller.wait_idle(timeout=10)

        instruction = "Tell the caller their parcel ships on Friday."
        await page.page.get_by_label("Tell the assistant").fill(instruction)
        await page.page.get_by_role("button", name="Send instruction").click()
        await page.page.locator("#done").wait_for()
        assert await page.page.locator("#done").inner_text() == "Sent to the call: instruct."
        (session,) = sim.sessions

        def instructed() -> bool:
            return any(
                event["type"] == "response.create" and instruction in event["response"].get("instructions", "")
                for _, event in session.received
            )

        assert await wait_for(instructed, timeout=5)
        await page.shot("call")

        await page.page.get_by_role("button", name="Hang up").click()
        assert await caller.wait_closed(timeout=5) is not None
        assert await wait_for(lambda: caller.call_sid not in carrier.runtime.calls, timeout=5)
        await expect(page.page.locator("#outcome")).to_have_text("console_hangup")
        assert await page.page.locator("#step-in").count() == 0

        await page.page.get_by_role("link", name="Live calls").click()
        await page.page.locator("#live-rows").get_by_text("No calls right now.").wait_for(timeout=2000)

        await page.page.get_by_role("link", name="History").click()
        await page.page.get_by_label("Number").fill("1234")
        await page.page.get_by_label("Outcome").select_option("console_hangup")
        await page.page.get_by_role("button", name="Search").click()
        assert await page.page.locator("#found").inner_text() == "1 call found."
        await page.shot("history")
        await page.page.locator("#history-rows").get_by_role("link", name=caller.call_sid).click()
        await page.page.wait_for_url(f"**/console/calls/{caller.call_sid}")
        lines = await transcript.locator("li .who").all_inner_texts()
        assert lines[0] == "Assistant" and "Operator" in lines and lines[-1] == "Ended"
        await page.shot("record")
        assert page.errors == []
        await page.page.close()  # its event stream ends before the relays stop


async def test_without_the_token_the_console_does_not_exist(relay: LocalRelay) -> None:
    async with httpx.AsyncClient(base_url=relay.base_url) as http:
        for path in ("/console", "/console/live", "/console/events", "/console/history", "/console/calls/CA1"):
            assert (await http.get(path)).status_code == 404
        assert (await http.post("/console", data={"token": "x"})).status_code == 404


async def signed_in_client(http: httpx.AsyncClient) -> str:
    """Sign in; the session's CSRF token."""
    response = await http.post("/console", data={"token": CONSOLE_TOKEN})
    assert response.status_code == 303 and response.headers["location"] == "/console/live"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # PUBLIC_URL is http:// here
    page = await http.get("/console/live")
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert match is not None
    return match.group(1)


async def test_every_page_and_the_event_stream_need_the_session_and_every_action_its_csrf_token(
    fast_sim: RealtimeSimulator,
) -> None:
    async with LocalRelay(console_settings(fast_sim.url)) as relay:
        caller = make_caller(relay)
        await caller.connect()
        sid = caller.call_sid
        async with httpx.AsyncClient(base_url=relay.base_url) as anonymous:
            for path in ("/console/live", "/console/history", f"/console/calls/{sid}"):
                response = await anonymous.get(path)
                assert (response.status_code, response.headers["location"]) == (303, "/console")
            assert (await anonymous.get("/console/events")).status_code == 401
        async with httpx.AsyncClient(base_url=relay.base_url, cookies={"relay_console": "abc.9999999999.00"}) as forged:
            assert (await forged.get("/console/live")).status_code == 303
        async with httpx.AsyncClient(base_url=relay.base_url) as anonymous:
            refused = await anonymous.post(f"/console/calls/{sid}", data={"action": "hangup", "csrf": "x"})
            assert refused.status_code == 401
        async with httpx.AsyncClient(base_url=relay.base_url) as http:
            csrf = await signed_in_client(http)
            assert (await http.get("/console/live")).status_code == 200
            without = await http.post(f"/console/calls/{sid}", data={"action": "hangup"})
            wrong = await http.post(f"/console/calls/{sid}", data={"action": "hangup", "csrf": "0" * 64})
            assert (without.status_code, wrong.status_code) == (403, 403)
            assert (await http.post("/console/signout", data={})).status_code == 403
            await asyncio.sleep(0.3)
            assert sid in relay.runtime.calls  # nothing was done to the call
            transfer = await http.post(
                f"/console/calls/{sid}", data={"action": "transfer", "destination": "x", "csrf": csrf}
            )
            assert transfer.status_code == 400  # the default profile has no transfer destinations
            done = await http.post(f"/console/calls/{sid}", data={"action": "hangup", "csrf": csrf})
            assert (done.status_code, done.headers["location"]) == (303, f"/console/calls/{sid}?done=hangup-sent")
            assert await caller.wait_closed(timeout=5) is not None
            record = await relay.runtime.store.get_call(sid)
            assert record is not None
            (audit,) = [e for e in record.entries if e["kind"] == "console"]
            assert (audit["action"], audit["delivered"], audit["by"].startswith("console:")) == ("hangup", True, True)
            assert record.meta["end_reason"] == "console_hangup"


async def test_wrong_tokens_are_rate_limited_per_client_across_instances(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    settings = console_settings(fast_sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    async with LocalRelay(settings) as first, LocalRelay(settings) as second:
        async with httpx.AsyncClient(base_url=first.base_url) as a, httpx.AsyncClient(base_url=second.base_url) as b:
            statuses = [
                (await (a if i % 2 else b).post("/console", data={"token": "wrong"})).status_code for i in range(5)
            ]
            assert statuses == [401] * 5
            limited = await a.post("/console", data={"token": CONSOLE_TOKEN})
            assert limited.status_code == 429
            assert "Too many failed sign-ins" in limited.text
            assert (await b.post("/console", data={"token": CONSOLE_TOKEN})).status_code == 429


async def test_the_session_cookie_is_secure_behind_https(fast_sim: RealtimeSimulator) -> None:
    settings = console_settings(fast_sim.url, public_url="https://relay.example.com")
    async with LocalRelay(settings) as relay, httpx.AsyncClient(base_url=relay.base_url) as http:
        response = await http.post("/console", data={"token": CONSOLE_TOKEN})
    assert response.status_code == 303
    assert "Secure" in response.headers["set-cookie"]


def test_the_console_token_is_a_secret_with_the_usual_strength_rules() -> None:
    from relay.env import ConfigError

    base = {
        "OPENAI_API_KEY": API_KEY,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "RELAY_STREAM_SECRET": "stream-secret-7c1e9a3b5d2f4e6a8b0c1d3e5f7a9b2c",
    }
    for weak in ("short", "changeme-changeme-changeme-changeme"):
        with pytest.raises(ConfigError, match="RELAY_CONSOLE_TOKEN"):
            Settings.from_env({**base, "RELAY_CONSOLE_TOKEN": weak})
    assert Settings.from_env({**base, "RELAY_CONSOLE_TOKEN": CONSOLE_TOKEN}).console_token == CONSOLE_TOKEN
    assert Settings.from_env(base).console_token is None


async def test_the_console_demo_prints_a_url_and_a_token_that_signs_in_to_live_simulated_calls() -> None:
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "demo", "--console", stdout=asyncio.subprocess.PIPE, env=os.environ.copy()
    )
    assert demo.stdout is not None
    try:
        url_line = (await asyncio.wait_for(demo.stdout.readline(), 20)).decode()
        token_line = (await asyncio.wait_for(demo.stdout.readline(), 5)).decode()
        assert url_line.startswith("console: http://127.0.0.1:") and url_line.endswith("/console\n")
        assert token_line.startswith("sign-in token (this run only): ")
        url, token = url_line.split(" ", 1)[1].strip(), token_line.rsplit(" ", 1)[1].strip()
        base = url.removesuffix("/console")
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.post("/console", data={"token": token})).status_code == 303

            async def live_calls() -> int:
                return (await http.get("/console/live?fragment=1")).text.count("<tr data-call=")

            deadline = time.monotonic() + 10
            while await live_calls() < DEMO_CALLS and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await live_calls() == DEMO_CALLS  # the demo keeps this many calls going
    finally:
        demo.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(demo.wait(), 20) == 0


async def test_a_transfer_from_the_console_dials_only_a_destination_of_the_calls_profile(
    fast_sim: RealtimeSimulator,
) -> None:
    agent = AgentSettings(transfer_numbers={"billing": "+15550003333"})
    with TwilioApiRecorder() as api:
        settings = console_settings(fast_sim.url, agent=agent, twilio_account_sid=ACCOUNT_SID, twilio_api_base=api.url)
        async with LocalRelay(settings) as relay, httpx.AsyncClient(base_url=relay.base_url) as http:
            caller = make_caller(relay)
            await caller.connect()
            assert await caller.wait_for_audio(200, timeout=5)
            csrf = await signed_in_client(http)
            page = await http.get(f"/console/calls/{caller.call_sid}")
            assert '<select id="destination" name="destination"><option>billing</option></select>' in page.text
            form, path = {"action": "transfer", "csrf": csrf}, f"/console/calls/{caller.call_sid}"
            elsewhere = await http.post(path, data={**form, "destination": "+15559999999"})
            assert elsewhere.status_code == 400
            done = await http.post(path, data={**form, "destination": "billing"})
            assert done.headers["location"] == f"/console/calls/{caller.call_sid}?done=transfer-sent"
            assert await caller.wait_closed(timeout=5) == 1000
            assert await wait_for(lambda: not relay.runtime.calls, timeout=5)
            record = await relay.runtime.store.get_call(caller.call_sid)
    (redirect,) = api.requests
    assert redirect.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json"
    assert "<Dial><Number>+15550003333</Number></Dial>" in redirect.form["Twiml"][0]
    assert record is not None and record.meta["end_reason"] == "transferred"
    (audit,) = [e for e in record.entries if e["kind"] == "console"]
    assert (audit["action"], audit["destination"], audit["delivered"]) == ("transfer", "billing", True)


async def test_the_consoles_of_one_instance_share_one_subscription_and_each_gets_every_event(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    """Each console on its own subscription would hold one of the store's pooled connections, which
    the calls' own reads need: an instance has one however many consoles follow it."""
    settings = console_settings(fast_sim.url, redis_url=redis_url, redis_prefix=store_prefix)
    channel = f"{store_prefix}console:events"
    plain = redis.Redis.from_url(redis_url)
    async with LocalRelay(settings) as carrier, LocalRelay(settings) as serving:
        async with httpx.AsyncClient(base_url=serving.base_url, timeout=10) as http:
            await signed_in_client(http)
            async with contextlib.AsyncExitStack() as streams:
                lines = []
                for _ in range(3):
                    response = await streams.enter_async_context(http.stream("GET", "/console/events"))
                    assert response.headers["content-type"].startswith("text/event-stream")
                    lines.append(response.aiter_lines())
                for stream in lines:  # each is subscribed once it says it is ready
                    while await anext(stream) != "event: ready":
                        pass
                    assert await anext(stream) == "data: {}"
                assert plain.pubsub_numsub(channel) == [(channel.encode(), 1)]
                caller = make_caller(carrier)
                await caller.connect()

                async def started(stream: Any) -> dict[str, Any]:
                    while True:
                        line = await anext(stream)
                        if line.startswith("data: "):
                            event: dict[str, Any] = orjson.loads(line.removeprefix("data: "))
                            if event["kind"] == "started":
                                return event

                for stream in lines:
                    event = await asyncio.wait_for(started(stream), 5)
                    assert (event["call_sid"], event["direction"], "from" in event) == (
                        caller.call_sid,
                        "inbound",
                        False,
                    )
                await caller.hangup()
        assert await wait_for(lambda: plain.pubsub_numsub(channel) == [(channel.encode(), 0)], timeout=5)
    plain.close()
