"""`python -m relay serve` refuses an unsafe or unusable configuration: exit 2, one stderr line
`configuration error: …` naming the variable, within seconds and before any worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port

from relay.config import Settings
from relay.env import SECRET_ENV, ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOOD_SECRET = "9c1f4e7a2b8d5036c1e4f7a2b8d50369"  # 32 bytes
GOOD_ENV = {
    "OPENAI_API_KEY": "sk-test-startup-0a1b2c3d4e5f6a7b",
    "TWILIO_AUTH_TOKEN": "test-auth-token-5f2b9c0e7d",
    "RELAY_STREAM_SECRET": GOOD_SECRET,
    "RELAY_API_TOKEN": GOOD_SECRET[::-1],
    "HOST": "127.0.0.1",
}
# Start-up checks are done well within this (the interpreter and imports take most of it).
REFUSAL_DEADLINE_S = 8.0


def refused(env: dict[str, str], *args: str) -> tuple[str, str]:
    """Run serve; assert it exits 2 in time with exactly one `configuration error:` stderr line."""
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "TWILIO_", "OPENAI_", "AZURE_"))
        and k not in ("REDIS_URL", "PORT", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR", "LOG_LEVEL")
    }
    full.update({**GOOD_ENV, "PORT": str(free_port()), "PYTHONUNBUFFERED": "1"})
    full.update(env)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", *args],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=REFUSAL_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"serve did not refuse within {REFUSAL_DEADLINE_S} s; it started: {stdout[-1500:]}")
    elapsed = time.monotonic() - started
    lines = stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, stderr[-1500:], stdout[-1500:])
    assert len(lines) == 1, stderr
    assert lines[0].startswith("configuration error: "), stderr
    assert "relay worker starting" not in stdout and "Uvicorn running" not in stdout
    assert elapsed < REFUSAL_DEADLINE_S
    return lines[0].removeprefix("configuration error: "), stdout


# ---- secrets: no placeholder shipped in this repository, no short keys ------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_API_KEY", "replace-me"),  # infra/relay.env.example before this check existed
        ("AZURE_OPENAI_API_KEY", "changeme"),
        ("TWILIO_AUTH_TOKEN", "replace-me"),
        ("TWILIO_AUTH_TOKEN", "..."),
        ("RELAY_STREAM_SECRET", "REPLACE_ME"),  # infra/k8s/secret.example.yaml
        ("RELAY_API_TOKEN", "replace-me"),
        ("RELAY_CALLER_KEY_SECRET", "<your-secret>"),
        ("RELAY_API_TOKEN", "REPLACE_ME_WITH_OPENSSL_RAND_HEX_32_OUTPUT"),  # long, still a placeholder
    ],
)
def test_placeholder_secrets_are_refused(name: str, value: str) -> None:
    message, _ = refused({name: value})
    assert message.startswith(f"{name} is a placeholder"), message


@pytest.mark.parametrize("name", ["RELAY_STREAM_SECRET", "RELAY_API_TOKEN", "RELAY_CALLER_KEY_SECRET"])
def test_secrets_shorter_than_32_bytes_are_refused_without_echoing_them(name: str) -> None:
    short = "f3a9c2e17b5d4a8c9e0f1a2b3c4d5e6"  # 31 bytes
    message, _ = refused({name: short})
    assert message == f"{name} is 31 bytes; it must be at least 32 random bytes (e.g. `openssl rand -hex 32`)"
    assert short not in message


# ---- PORT, REDIS_URL, PROMETHEUS_MULTIPROC_DIR, handlers, workers --------------------------------


@pytest.mark.parametrize("port", ["99999", "0", "80a", "８０８０"])
def test_a_port_outside_1_to_65535_is_refused(port: str) -> None:
    message, _ = refused({"PORT": port})
    assert message == f"PORT must be a TCP port between 1 and 65535, got {port!r}"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("localhost:6379", "REDIS_URL is not a usable Redis URL (Redis URL must specify one of the following"),
        ("redis://:s3cret-pass@redis:63a9/0", "REDIS_URL is not a usable Redis URL (Port could not be cast"),
        ("redis://redis:0/0", "REDIS_URL: port must be between 1 and 65535, got 0"),
        ("redis://:6379/0", "REDIS_URL has no host"),
        ("redis://redis:6379/sessions", "REDIS_URL: the path must be a database number"),
        ("redis://redis:6379/0?db=-1", "REDIS_URL: the database number must be a non-negative integer"),
        ("redis://redis:6379/0?socket_timeout=soon", "REDIS_URL is not a usable Redis URL (Invalid value for"),
        ("unix://", "REDIS_URL: a unix:// URL needs a socket path"),
        ("rediss://:REPLACE_ME@redis.example.internal:6380/0", "REDIS_URL has a placeholder password"),
    ],
)
def test_a_malformed_redis_url_is_refused_without_its_password(url: str, expected: str) -> None:
    message, _ = refused({"REDIS_URL": url})
    assert message.startswith(expected), message
    assert "s3cret-pass" not in message


def test_an_unusable_metrics_directory_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "metrics"
    a_file.write_text("not a directory")
    message, _ = refused({"PROMETHEUS_MULTIPROC_DIR": str(a_file), "WEB_CONCURRENCY": "2"})
    assert message == f"PROMETHEUS_MULTIPROC_DIR={str(a_file)!r} exists and is not a directory"
    below_a_file = a_file / "sub"
    message, _ = refused({"PROMETHEUS_MULTIPROC_DIR": str(below_a_file), "WEB_CONCURRENCY": "2"})
    assert message == f"PROMETHEUS_MULTIPROC_DIR={str(below_a_file)!r} cannot be created: Not a directory"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('raise RuntimeError("orders database not configured")\n', "RuntimeError: orders database not configured"),
        ("def broken(:\n", "SyntaxError: "),
        ("import no_such_dependency_xyz\n", "ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
    ],
)
def test_a_handler_module_that_fails_to_import_is_one_line(tmp_path: Path, source: str, expected: str) -> None:
    (tmp_path / "site_tools.py").write_text(source)
    env = {"RELAY_HANDLERS": "handlers.call_control,site_tools", "PYTHONPATH": str(tmp_path)}
    message, _ = refused(env)
    assert message.startswith(f"RELAY_HANDLERS: cannot import 'site_tools': {expected}"), message


@pytest.mark.parametrize("value", ["0", "-2", "two", "²"])
def test_web_concurrency_below_one_or_not_an_integer_is_refused(value: str) -> None:
    message, _ = refused({"WEB_CONCURRENCY": value})
    assert message == f"WEB_CONCURRENCY must be a positive integer, got {value!r}"


def test_a_negative_workers_flag_is_refused() -> None:
    message, _ = refused({}, "--workers", "-1")
    assert message == "--workers must be 0 (use WEB_CONCURRENCY) or a positive integer, got -1"


# ---- the examples shipped in infra/ cannot be started as they are ----------------------------------


def test_the_compose_example_environment_is_refused_as_shipped() -> None:
    example: dict[str, str] = {}
    for raw in (ROOT / "infra" / "relay.env.example").read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            key, _, value = raw.partition("=")
            example[key.strip()] = value.strip()
    message, _ = refused(example)
    assert message == "OPENAI_API_KEY is a placeholder ('REPLACE_ME'); set the real secret"


def test_every_secret_of_the_example_kubernetes_secret_is_refused() -> None:
    manifest = yaml.safe_load((ROOT / "infra" / "k8s" / "secret.example.yaml").read_text())
    values: dict[str, str] = manifest["stringData"]
    secrets = [name for name in SECRET_ENV if name in values]
    assert secrets == ["OPENAI_API_KEY", "TWILIO_AUTH_TOKEN", "RELAY_STREAM_SECRET", "RELAY_API_TOKEN"]
    for name in secrets:
        with pytest.raises(ConfigError, match=rf"^{name} is a placeholder"):
            Settings.from_env({**GOOD_ENV, name: values[name]})
    with pytest.raises(ConfigError, match=r"^REDIS_URL has a placeholder password"):
        Settings.from_env({**GOOD_ENV, "REDIS_URL": values["REDIS_URL"]})
