"""What an operator monitors: process, call-duration and build metrics from real serve processes (one
worker and several), and the shipped Grafana dashboard and Prometheus alert rules, checked against
the metrics the relay really exports (and with promtool, Debian's `prometheus` package)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_support import RelayProcess, Samples, caller_for, metric, parse_metrics
from prometheus_client import CollectorRegistry

from relay.metrics import Metrics, package_version
from relay.sim.realtime import RealtimeSimulator

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "infra" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
# Series a Prometheus server makes itself, not the relay.
PROMETHEUS_OWN = {"up"}


async def scrape(relay: RelayProcess) -> Samples:
    response = await relay.get("/metrics")
    assert response.status_code == 200
    return parse_metrics(response.text)[1]


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def cpu_seconds_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


# ---- process, call-duration and build metrics ------------------------------------------------------


async def test_one_process_exports_its_cpu_memory_call_durations_and_build(fast_sim: RealtimeSimulator) -> None:
    relay = RelayProcess(fast_sim.url, OPENAI_REALTIME_MODEL="gpt-realtime", LOG_LEVEL="warning")
    await relay.start()
    try:
        caller = caller_for(relay)
        began = time.monotonic()
        await caller.connect()
        assert await caller.wait_for_audio(300, timeout=10)
        await caller.wait_idle(timeout=5)
        await caller.hangup()

        deadline = time.monotonic() + 5
        samples = await scrape(relay)
        while metric(samples, "relay_call_duration_seconds_count") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            samples = await scrape(relay)
        ended = time.monotonic()  # the relay's teardown, which observes the duration, is over by now
        cpu_after = cpu_seconds_of(relay.pid)
        rss = rss_of(relay.pid)
    finally:
        await relay.close()

    # one call, observed once, no longer than the test saw it last
    assert metric(samples, "relay_call_duration_seconds_count") == 1
    assert 0 < metric(samples, "relay_call_duration_seconds_sum") <= ended - began
    assert metric(samples, "relay_call_duration_seconds_bucket", le="+Inf") == 1
    # the process's own resources, as the kernel reports them (one process: no pid label)
    cpu = [(labels, value) for name, labels, value in samples if name == "relay_process_cpu_seconds"]
    assert len(cpu) == 1 and "pid" not in cpu[0][0]
    assert 0 < cpu[0][1] <= cpu_after + 0.05
    memory = metric(samples, "relay_process_resident_memory_bytes")
    assert 0.5 * rss < memory < 1.5 * rss, (memory, rss)
    assert metric(samples, "relay_process_open_fds") > 3
    assert abs(metric(samples, "relay_process_start_time_seconds") - time.time()) < 120
    build = [labels for name, labels, value in samples if name == "relay_build_info" and value == 1]
    assert build == [
        {"version": package_version(), "python": platform.python_version(), "dialect": "ga", "model": "gpt-realtime"}
    ]


async def test_each_worker_exports_its_own_cpu_and_memory_in_multiprocess_mode(
    fast_sim: RealtimeSimulator, tmp_path: Path
) -> None:
    relay = RelayProcess(
        fast_sim.url,
        WEB_CONCURRENCY="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        OPENAI_REALTIME_DIALECT="beta",
        LOG_LEVEL="info",
    )
    await relay.start()
    try:

        def workers() -> set[int]:
            return {line["pid"] for line in relay.lines if line.get("msg") == "relay worker starting"}

        deadline = time.monotonic() + 10
        samples = await scrape(relay)
        while time.monotonic() < deadline:
            series = {labels.get("pid") for name, labels, _ in samples if name == "relay_process_cpu_seconds"}
            if len(workers()) == 2 and series == {str(pid) for pid in workers()}:
                break
            await asyncio.sleep(0.2)  # each worker writes its values every second
            samples = await scrape(relay)
        pids = workers()
        rss = {pid: rss_of(pid) for pid in pids}
    finally:
        await relay.close()

    assert len(pids) == 2
    for name in ("relay_process_cpu_seconds", "relay_process_resident_memory_bytes", "relay_process_open_fds"):
        series = {labels.get("pid"): value for n, labels, value in samples if n == name}
        assert set(series) == {str(pid) for pid in pids}, (name, series)
        assert all(value > 0 for value in series.values()), (name, series)
    memory = {int(labels["pid"]): v for n, labels, v in samples if n == "relay_process_resident_memory_bytes"}
    for pid in pids:
        assert 0.5 * rss[pid] < memory[pid] < 1.5 * rss[pid], (pid, memory[pid], rss[pid])
    # the build is one series whichever worker answers, not one per worker
    build = [labels for name, labels, value in samples if name == "relay_build_info"]
    assert [(b["dialect"], b["model"]) for b in build] == [("beta", "gpt-4o-realtime-preview")]


# ---- the shipped dashboard and alert rules ---------------------------------------------------------


def exported_series() -> dict[str, set[str]]:
    """Every series name the relay exports (histograms: _bucket, _count, _sum) -> its label names."""
    metrics = Metrics(CollectorRegistry())
    metrics.set_build_info("ga", "gpt-realtime")
    families: dict[str, set[str]] = {}
    for collector in metrics.registry.collect():
        labels = set(getattr(metrics_of(metrics, collector.name), "_labelnames", ()))
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
            "gauge": ("",),
        }[collector.type]
        for suffix in suffixes:
            families[collector.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return families


def metrics_of(metrics: Metrics, family: str) -> Any:
    for value in vars(metrics).values():
        if getattr(value, "_name", None) == family:
            return value
    raise AssertionError(f"no metric object for {family}")


_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "on", "ignoring",
    "group_left", "group_right", "max", "min", "avg", "count", "topk", "bottomk", "clamp_min", "clamp_max",
    "and", "or", "unless", "absent", "absent_over_time", "max_over_time", "min_over_time", "avg_over_time",
    "delta", "deriv", "time", "vector", "scalar", "label_replace", "changes", "resets", "offset", "bool",
}  # fmt: skip


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every series selector in a PromQL expression."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    found = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", without_ranges):
        name, matchers = match.group(1), match.group(2) or ""
        before = without_ranges[: match.start()].rstrip()
        if name in _PROMQL_WORDS or before.endswith(("by (", "by(", "without (", "on (", "ignoring (")):
            continue
        if before.endswith(",") and re.search(r"(by|without|on|ignoring)\s*\([^)]*$", before):
            continue  # a label in a by (...) list
        labels = {m.group(1) for m in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)", matchers)}
        if re.fullmatch(r"\d.*|[eE]", name):
            continue
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            exprs.extend(target["expr"] for target in panel.get("targets", []) if "expr" in target)

    walk(dashboard["panels"])
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def check_exprs(exprs: list[str], where: str) -> set[str]:
    exported = exported_series()
    used: set[str] = set()
    for expr in exprs:
        selectors = promql_selectors(expr)
        assert selectors, f"{where}: no series in {expr!r}"
        for name, labels in selectors:
            if name in PROMETHEUS_OWN:
                continue
            assert name in exported, f"{where}: {name} is not exported by the relay (in {expr!r})"
            unknown = labels - exported[name] - {"job", "instance", "pod", "namespace"}
            assert not unknown, f"{where}: {name} has no label {sorted(unknown)} (in {expr!r})"
            used.add(name)
        relay_series = {name for name, _ in selectors if name not in PROMETHEUS_OWN}
        if len(relay_series) == 1:  # one metric: every label it is grouped by must be one of its own
            (name,) = relay_series
            unknown = grouping_labels(expr) - exported[name] - {"job", "instance", "pod", "namespace"}
            assert not unknown, f"{where}: {name} is grouped by missing labels {sorted(unknown)} (in {expr!r})"
    return used


def test_the_dashboard_queries_only_metrics_the_relay_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    exprs = dashboard_exprs()
    used = check_exprs(exprs, "dashboard")
    for needed in (
        "relay_active_calls",
        "relay_calls_refused_total",
        "relay_calls_ended_total",
        "relay_mouth_to_ear_seconds_bucket",
        "relay_store_dropped_writes_total",
        "relay_draining",
        "relay_process_cpu_seconds",
        "relay_process_resident_memory_bytes",
        "relay_call_duration_seconds_bucket",
        "relay_build_info",
    ):
        assert needed in used, f"the dashboard has no panel on {needed}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_the_alert_rules_use_only_metrics_the_relay_exports() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    used = check_exprs([rule["expr"] for rule in rules], "alerts")
    for needed in (
        "relay_calls_refused_total",
        "relay_calls_ended_total",
        "relay_mouth_to_ear_seconds_bucket",
        "relay_store_dropped_writes_total",
        "relay_draining",
    ):
        assert needed in used, f"no alert on {needed}"
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert not grouping_labels(rule["expr"]) - {"reason", "code", "instance", "job", "pod", "le", "stage"}


def test_the_metric_name_check_catches_a_typo() -> None:
    with pytest.raises(AssertionError, match="relay_calls_refused_totl"):
        check_exprs(['sum(rate(relay_calls_refused_totl{reason="full"}[5m]))'], "probe")
    with pytest.raises(AssertionError, match="no label"):
        check_exprs(['sum(rate(relay_calls_refused_total{cause="full"}[5m]))'], "probe")
    with pytest.raises(AssertionError, match="grouped by missing labels"):
        check_exprs(["sum by (code) (rate(relay_calls_ended_total[5m]))"], "probe")


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing under CI: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return binary


def test_promtool_accepts_the_alert_rules_and_their_unit_tests() -> None:
    binary = promtool()
    check = subprocess.run(
        [binary, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    tests = subprocess.run(
        [binary, "test", "rules", str(ALERT_TESTS)],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
