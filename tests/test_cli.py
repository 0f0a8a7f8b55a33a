"""The command line: clear configuration errors, never a traceback or a restart loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "TWILIO_", "OPENAI_", "AZURE_OPENAI_"))}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve"], env=full, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TWILIO_AUTH_TOKEN is required"),
        ({"RELAY_INSECURE_DEV": "1", "RELAY_HANDLERS": "no_such_package.tools"}, "RELAY_HANDLERS: cannot import"),
        ({"RELAY_INSECURE_DEV": "1", "MAX_CALLS": "many"}, "MAX_CALLS must be an integer"),
        ({"RELAY_INSECURE_DEV": "1", "OPENAI_REALTIME_DIALECT": "v2"}, "OPENAI_REALTIME_DIALECT must be one of"),
        ({"RELAY_INSECURE_DEV": "1", "WEB_CONCURRENCY": "lots"}, "WEB_CONCURRENCY must be a positive integer"),
        ({"RELAY_INSECURE_DEV": "1", "RELAY_DRAIN_MODE": "later"}, "RELAY_DRAIN_MODE must be one of"),
        (
            {"RELAY_INSECURE_DEV": "1", "RELAY_DRAIN_MODE": "handoff", "REDIS_URL": ""},
            "RELAY_DRAIN_MODE=handoff needs REDIS_URL",
        ),
    ],
)
def test_bad_configuration_is_one_clear_line(env: dict[str, str], message: str) -> None:
    result = run_serve(env)
    assert result.returncode == 2
    assert f"configuration error: {message}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_profile_file_is_reported_before_any_worker_starts(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[profiles.support]\nvoice = "robot"\n')
    result = run_serve({"RELAY_INSECURE_DEV": "1", "RELAY_PROFILES": str(profiles), "WEB_CONCURRENCY": "2"})
    assert result.returncode == 2
    assert "configuration error: RELAY_PROFILES" in result.stderr
    assert "profiles.support.voice" in result.stderr and "robot" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "relay", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for command in ("serve", "demo", "simulator"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPENAI_WEBHOOK_SECRET": "changeme"}, "OPENAI_WEBHOOK_SECRET is a placeholder"),
        ({"OPENAI_WEBHOOK_SECRET": "whsec_short"}, "OPENAI_WEBHOOK_SECRET is 11 bytes"),
        ({"OPENAI_API_BASE": "ftp://api.example.com/v1"}, "OPENAI_API_BASE must be an https:// URL"),
        ({"OPENAI_API_BASE": "http://api.example.com/v1"}, "OPENAI_API_BASE must use https://"),
    ],
)
def test_sip_mode_settings_are_checked_at_start_up(env: dict[str, str], message: str) -> None:
    result = run_serve({"RELAY_INSECURE_DEV": "1", **env})
    assert result.returncode == 2
    assert f"configuration error: {message}" in result.stderr


def test_the_sip_demo_runs_one_call_offline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "TWILIO_", "OPENAI_", "AZURE_OPENAI_"))}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--sip"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "  REST requests: accept, hangup\n" in result.stdout
    assert "  ended: assistant_ended\n" in result.stdout
