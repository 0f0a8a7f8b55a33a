"""GET /calls: the live calls of every instance, from any instance, through the ownership registry."""

from __future__ import annotations

import signal
import time
from typing import Any

from conftest import wait_for
from ops_support import API_TOKEN, RelayProcess, caller_for

from relay.sim.realtime import RealtimeSimulator

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def listed(relay: RelayProcess) -> list[dict[str, Any]]:
    response = await relay.get("/calls", headers=AUTH)
    assert response.status_code == 200, response.text
    calls: list[dict[str, Any]] = response.json()["calls"]
    return calls


async def test_any_instance_lists_every_live_call_and_an_orphan_once_its_owner_dies(
    fast_sim: RealtimeSimulator, redis_url: str, store_prefix: str
) -> None:
    a, b = (RelayProcess(fast_sim.url, REDIS_URL=redis_url, RELAY_REDIS_PREFIX=store_prefix) for _ in range(2))
    caller = caller_for(a)
    try:
        await a.start()
        await b.start()
        assert [
            (await b.get("/calls")).status_code,
            (await b.get("/calls", headers={"Authorization": "Bearer x"})).status_code,
        ] == [401, 401]
        assert await listed(b) == []
        await caller.connect()
        assert await caller.wait_for_audio(200, timeout=10)
        rows: list[dict[str, Any]] = []

        async def refresh() -> None:
            rows[:] = await listed(b)

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the record is written with the claim, its phase with each beat
            await refresh()
            if rows and rows[0]["phase"] != "connecting":
                break
        (row,) = rows
        assert set(row) == {"call_sid", "instance", "started", "direction", "profile", "phase", "orphaned"}
        assert row["call_sid"] == caller.call_sid
        assert (row["direction"], row["profile"], row["orphaned"]) == ("inbound", "default", False)
        assert row["phase"] in {"greeting", "listening", "assistant_speaking"}
        assert row["instance"].endswith(f"-{a.proc.pid if a.proc else 0}")
        assert await listed(a) == rows  # the same from the owner

        a.signal(signal.SIGKILL)  # the owner dies without a word: its presence in Redis goes with it
        assert await a.wait(timeout=5) is not None
        killed = time.monotonic()
        orphaned = False
        while time.monotonic() - killed < 8:
            current = await listed(b)
            if current and current[0]["orphaned"]:
                orphaned = True
                break
            await wait_for(lambda: False, timeout=0.25)
        assert orphaned, current
        assert time.monotonic() - killed < 1
        assert [(c["call_sid"], c["instance"]) for c in current] == [(caller.call_sid, row["instance"])]
    finally:
        await caller.hangup()
        await a.close()
        await b.close()
    assert "Traceback" not in b.output()
