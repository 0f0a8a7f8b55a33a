"""The benchmark harness itself works: real processes, a few calls, every frame arrives.

Three calls for a few seconds against each relay (the floor, and this project with Redis database
RELAY_TEST_BENCH_REDIS_DB, default 14, on the shared Redis or a private redis-server), each point
with its own simulator, relay and generator processes. No timing assertions: this machine is shared
and the figures are the benchmark's job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bench.options import Options
from bench.runner import run_point
from tests.conftest import BENCH_REDIS_DB_ENV, DEFAULT_BENCH_DB, redis_db_from_env, shared_redis_url

CALLS = 3


@pytest.fixture(scope="module")
def redis_url() -> Any:
    with shared_redis_url(redis_db_from_env(BENCH_REDIS_DB_ENV, DEFAULT_BENCH_DB)) as url:
        yield url


def _check(point: dict[str, Any]) -> None:
    frames = point["frames"]
    assert point["calls_ok"] == CALLS, point["call_errors"]
    assert point["realtime_sessions"] == CALLS
    assert frames["caller_sent"] > CALLS * 100  # > 2 s of 20 ms frames per call
    assert frames["realtime_received"] == frames["caller_sent"]
    assert frames["up_reordered"] == frames["up_gaps"] == frames["up_unmarked"] == 0
    assert frames["realtime_chunks_sent"] > 0
    assert frames["caller_received"] == frames["realtime_chunks_sent"]
    assert frames["down_reordered"] == frames["down_gaps"] == frames["crosstalk"] == 0
    assert point["latency_ms"]["caller_to_realtime"]["n"] > 0
    assert point["latency_ms"]["realtime_to_caller"]["n"] > 0
    assert 0 < point["marks"]["echoed"] <= point["marks"]["received"]  # audio still playing at hang-up: no echo
    assert point["cpu_ms_per_call_s"] > 0
    leaks = point["leaks"]
    assert leaks["upstream_sockets_left"] == 0
    assert leaks["caller_sockets_left"] == 0


@pytest.mark.timeout(90)
def test_floor_and_project_carry_every_frame(tmp_path: Path, redis_url: str) -> None:
    opts = Options(calls=[CALLS], seconds=3.0, out=tmp_path, redis_url=redis_url, gen_settle_s=1.0, barge_in=0.5)

    async def both() -> list[dict[str, Any]]:
        return [await run_point(kind, CALLS, opts) for kind in ("floor", "project")]

    floor, project = asyncio.run(both())
    _check(floor)
    _check(project)
    assert project["leaks"]["active_calls_metric"] == 0
    assert project["redis_keys"] > 0  # the calls were written to Redis (and cleaned up after)
    assert not project["log"]["levels"].get("error")


@pytest.mark.timeout(240)
def test_short_soak_holds_every_check(tmp_path: Path, redis_url: str) -> None:
    """The CI-sized soak: 50 calls for 30 s after a warm-up wave, Redis on; the same checks as the long one."""
    from bench.soak import soak

    opts = Options(calls=[50], seconds=30.0, out=tmp_path, redis_url=redis_url, gen_settle_s=1.0)
    result = asyncio.run(soak(opts, calls=50, seconds=30.0, warmup_s=30.0))
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, (failed, result["point"]["leaks"], result["point"]["frames"])
