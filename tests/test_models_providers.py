"""Model defaults and announced shutdowns, voices per dialect, and the upstream provider (OpenAI or Azure)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, free_port, make_caller, relay_settings, wait_for
from openai.types.beta.realtime import RealtimeClientEvent as BetaClientEvent
from openai.types.realtime import RealtimeClientEvent as GaClientEvent
from ops_support import RelayProcess
from pydantic import TypeAdapter

from relay.config import Settings
from relay.env import ConfigError
from relay.profiles import load_profiles, parse_profiles
from relay.realtime import models
from relay.realtime.dialect import get_dialect
from relay.realtime.endpoint import connect_target
from relay.runtime import interface_notices, model_notices
from relay.sim import ulaw
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig

ROOT = Path(__file__).resolve().parent.parent
CLIENT_TYPES = {"ga": TypeAdapter(GaClientEvent), "beta": TypeAdapter(BetaClientEvent)}
AZURE = {"RELAY_PROVIDER": "azure"}
BASE_ENV = {"RELAY_INSECURE_DEV": "1", "OPENAI_API_KEY": "sk-test-models-0000"}


def env_settings(**env: str) -> Settings:
    return Settings.from_env({**BASE_ENV, **env})


# ---- defaults and announced shutdowns ---------------------------------------------------------------


def test_defaults_are_models_without_an_announced_shutdown() -> None:
    settings = env_settings()
    assert (settings.model, settings.agent.transcription_model) == ("gpt-realtime-2.1", "gpt-transcribe")
    assert settings.model not in models.REALTIME_SHUTDOWNS
    assert settings.agent.transcription_model not in models.TRANSCRIPTION_SHUTDOWNS
    # both stay configurable
    custom = env_settings(OPENAI_REALTIME_MODEL="gpt-realtime-2", RELAY_TRANSCRIPTION_MODEL="gpt-live-transcribe")
    assert (custom.model, custom.agent.transcription_model) == ("gpt-realtime-2", "gpt-live-transcribe")
    assert model_notices(settings, load_profiles(None, settings.agent)) == []


def test_the_shutdown_table_matches_the_openai_package() -> None:
    """Every value the package's docstrings mark with a shutdown date is in the table, with that date."""
    from openai.types.realtime import audio_transcription, realtime_session_create_request

    def deprecated_block(module: Any) -> str:
        text = inspect.getsource(module)
        assert text.count("Deprecated values:") == 1
        return text.split("Deprecated values:")[1].split('"""')[0]

    realtime = deprecated_block(realtime_session_create_request)
    transcription = deprecated_block(audio_transcription)
    assert "Announced shutdown date: 2027-01-20" in realtime
    assert "Announced shutdown date:\n      2027-02-26" in transcription or "2027-02-26" in transcription
    assert set(models.REALTIME_SHUTDOWNS.values()) == {date(2027, 1, 20)}
    assert set(models.TRANSCRIPTION_SHUTDOWNS.values()) == {date(2027, 2, 26)}
    assert sorted(models.REALTIME_SHUTDOWNS) == sorted(realtime.split('"')[1::2])
    assert sorted(models.TRANSCRIPTION_SHUTDOWNS) == sorted(transcription.split('"')[1::2])


def test_a_configured_model_with_a_shutdown_is_named_with_its_date(tmp_path: Path) -> None:
    profiles_file = tmp_path / "p.toml"
    profiles_file.write_text(
        '[profiles.sales]\nmodel = "gpt-realtime-mini"\ntranscription_model = "whisper-1"\n'
        '[profiles.fine]\nmodel = "gpt-realtime-2.1-mini"\n'
    )
    settings = env_settings(
        OPENAI_REALTIME_MODEL="gpt-realtime",
        RELAY_TRANSCRIPTION_MODEL="gpt-4o-transcribe",
        RELAY_PROFILES=str(profiles_file),
    )
    profiles = load_profiles(settings.profiles_file, settings.agent)
    before = model_notices(settings, profiles, today=date(2026, 12, 1))
    assert before == [
        "OPENAI_REALTIME_MODEL=gpt-realtime: the realtime model gpt-realtime has an announced shutdown on "
        "2027-01-20; move to a current model (the relay's default is gpt-realtime-2.1)",
        "RELAY_TRANSCRIPTION_MODEL=gpt-4o-transcribe: the transcription model gpt-4o-transcribe has an announced "
        "shutdown on 2027-02-26; move to a current model (the relay's default is gpt-transcribe)",
        "profiles.sales.model=gpt-realtime-mini: the realtime model gpt-realtime-mini has an announced shutdown on "
        "2027-01-20; move to a current model (the relay's default is gpt-realtime-2.1)",
        "profiles.sales.transcription_model=whisper-1: the transcription model whisper-1 has an announced shutdown "
        "on 2027-02-26; move to a current model (the relay's default is gpt-transcribe)",
    ]
    on_the_day = model_notices(settings, profiles, today=date(2027, 1, 20))
    assert "has an announced shutdown on 2027-01-20" in on_the_day[0]
    after = model_notices(settings, profiles, today=date(2027, 1, 21))
    assert "gpt-realtime was shut down on 2027-01-20" in after[0]
    assert "has an announced shutdown on 2027-02-26" in after[1]  # the transcription date is still ahead
    assert "was shut down on 2027-02-26" in model_notices(settings, profiles, today=date(2027, 3, 1))[1]


async def test_serve_logs_the_shutdown_warning_at_start_up() -> None:
    sim = RealtimeSimulator()
    await sim.start()
    proc = RelayProcess(sim.url, OPENAI_REALTIME_MODEL="gpt-realtime-2025-08-28")
    try:
        await proc.start()
        warnings = [line for line in proc.lines if "announced shutdown" in line["msg"]]
    finally:
        await proc.close()
        await sim.stop()
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert "OPENAI_REALTIME_MODEL=gpt-realtime-2025-08-28" in warnings[0]["msg"] and "2027-01-20" in warnings[0]["msg"]


async def test_a_profile_model_reaches_the_url_and_the_session(tmp_path: Path) -> None:
    profiles_file = tmp_path / "p.toml"
    profiles_file.write_text('[profiles.sales]\nmodel = "gpt-realtime-2.1-mini"\n[numbers]\n"+15550002222" = "sales"\n')
    sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=100))
    await sim.start()
    try:
        async with LocalRelay(relay_settings(sim.url, profiles_file=str(profiles_file))) as relay:
            for index, number in enumerate(("+15550002222", "+15559990000")):
                caller = make_caller(relay, to_number=number)
                await caller.connect()
                assert await wait_for(lambda i=index: len(sim.sessions) > i and bool(sim.sessions[i].received))
                await caller.hangup()
                assert await wait_for(lambda: not relay.runtime.calls)
    finally:
        await sim.stop()
    sales, other = sim.sessions
    assert sales.query == {"model": "gpt-realtime-2.1-mini"}
    assert sales.received[0][1]["session"]["model"] == "gpt-realtime-2.1-mini"
    assert other.query == {"model": "gpt-realtime-2.1"}
    assert other.received[0][1]["session"]["model"] == "gpt-realtime-2.1"


# ---- voices per dialect ------------------------------------------------------------------------------


def test_beta_gets_a_beta_voice_and_refuses_ga_only_voices() -> None:
    beta = env_settings(OPENAI_REALTIME_DIALECT="beta")
    update = get_dialect("beta").session_update(beta.agent, model=beta.model, instructions="x")
    assert update["session"]["voice"] == "alloy"
    CLIENT_TYPES["beta"].validate_python(update)
    ga = env_settings()
    assert (
        get_dialect("ga").session_update(ga.agent, model=ga.model, instructions="x")["session"]["audio"]["output"][
            "voice"
        ]
        == "marin"
    )
    with pytest.raises(ConfigError, match=r"^RELAY_VOICE: unknown voice 'marin' for the beta dialect \(one of alloy,"):
        env_settings(OPENAI_REALTIME_DIALECT="beta", RELAY_VOICE="marin")
    with pytest.raises(ConfigError, match=r"^RELAY_VOICE: unknown voice 'voice_abc' for the beta dialect"):
        env_settings(OPENAI_REALTIME_DIALECT="beta", RELAY_VOICE="voice_abc")
    with pytest.raises(ConfigError, match=r"^RELAY_VOICE: unknown voice 'robot' for the ga dialect"):
        env_settings(RELAY_VOICE="robot")
    # the environment refuses what a profile file refuses: speed above 1.5
    with pytest.raises(ConfigError, match=r"^RELAY_VOICE_SPEED must be between 0.25 and 1.5, got 2.0"):
        env_settings(RELAY_VOICE_SPEED="2.0")
    with pytest.raises(ConfigError, match=r"^profiles.a.speed must be between 0.25 and 1.5, got 2.0"):
        parse_profiles({"profiles": {"a": {"speed": 2.0}}}, ga.agent, {})
    with pytest.raises(ConfigError, match=r"^profiles.a.voice: unknown voice 'cedar' for the beta dialect"):
        parse_profiles({"profiles": {"a": {"voice": "cedar"}}}, beta.agent, {}, dialect="beta")


def test_a_custom_ga_voice_is_sent_as_an_id_object() -> None:
    settings = env_settings(RELAY_VOICE="voice_1234")
    update = get_dialect("ga").session_update(settings.agent, model=settings.model, instructions="x")
    assert update["session"]["audio"]["output"]["voice"] == {"id": "voice_1234"}
    CLIENT_TYPES["ga"].validate_python(update)


async def test_the_simulator_refuses_a_voice_the_dialect_does_not_have() -> None:
    import orjson
    import websockets

    sim = RealtimeSimulator()
    await sim.start()
    try:
        async with websockets.connect(
            sim.url + "?model=gpt-4o-realtime-preview",
            additional_headers={"Authorization": f"Bearer {API_KEY}", "OpenAI-Beta": "realtime=v1"},
        ) as ws:
            assert orjson.loads(await ws.recv())["type"] == "session.created"
            await ws.send(orjson.dumps({"type": "session.update", "session": {"voice": "marin"}}).decode())
            error = orjson.loads(await ws.recv())
    finally:
        await sim.stop()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "invalid_value"
    assert error["error"]["param"] == "session.voice"
    assert error["error"]["message"].startswith("Invalid value: 'marin'. Supported values are: 'alloy', 'ash'")
    assert sim.sessions[0].session["voice"] == "alloy"  # unchanged


async def test_a_beta_call_with_default_settings_is_configured_without_error() -> None:
    """Built directly (as embedders and the demo do), beta settings still get a beta voice."""
    sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=300))
    await sim.start()
    try:
        async with LocalRelay(relay_settings(sim.url, dialect="beta")) as relay:
            caller = make_caller(relay)
            await caller.connect()
            assert await caller.wait_for_audio(300, timeout=5)
            await caller.hangup()
            assert await wait_for(lambda: not relay.runtime.calls)
    finally:
        await sim.stop()
    assert len(sim.sessions) == 1
    session = sim.sessions[0]
    assert [e for e in session.sent if e["type"] == "error"] == []
    assert [e["type"] for e in session.sent].count("session.updated") == 1
    assert session.received[0][1]["session"]["voice"] == "alloy"


# ---- providers: OpenAI and Azure OpenAI ---------------------------------------------------------------


def azure_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "RELAY_INSECURE_DEV": "1",
        "RELAY_PROVIDER": "azure",
        "AZURE_OPENAI_ENDPOINT": endpoint,
        "AZURE_OPENAI_DEPLOYMENT": "rt-prod",
        **extra,
    }


def test_connection_targets_per_provider_and_dialect() -> None:
    openai = env_settings()
    assert connect_target(openai, get_dialect("ga"), openai.model) == (
        "wss://api.openai.com/v1/realtime?model=gpt-realtime-2.1",
        {"Authorization": "Bearer sk-test-models-0000"},
    )
    ga = Settings.from_env(azure_env("https://res.openai.azure.com/", AZURE_OPENAI_API_KEY="az-key-1"))
    assert connect_target(ga, get_dialect("ga"), ga.model) == (
        "wss://res.openai.azure.com/openai/v1/realtime?model=rt-prod",
        {"api-key": "az-key-1"},
    )
    preview = Settings.from_env(
        azure_env(
            "https://res.openai.azure.com",
            OPENAI_REALTIME_DIALECT="beta",
            AZURE_OPENAI_AD_TOKEN="entra-token-1",
            AZURE_OPENAI_API_VERSION="2025-04-01-preview",
        )
    )
    assert connect_target(preview, get_dialect("beta"), preview.model) == (
        "wss://res.openai.azure.com/openai/realtime?api-version=2025-04-01-preview&deployment=rt-prod",
        {"Authorization": "Bearer entra-token-1", "OpenAI-Beta": "realtime=v1"},
    )
    # OPENAI_PROVIDER is the other name of the setting; the key wins over a token, as in the openai package
    both = Settings.from_env(
        {
            **azure_env("https://res.openai.azure.com"),
            "RELAY_PROVIDER": "",
            "OPENAI_PROVIDER": "azure",
            "AZURE_OPENAI_API_KEY": "k",
            "AZURE_OPENAI_AD_TOKEN": "t",
        }
    )
    assert connect_target(both, get_dialect("ga"), both.model)[1] == {"api-key": "k"}


def test_azure_transcription_is_off_until_a_deployment_is_named() -> None:
    azure = Settings.from_env(azure_env("https://res.openai.azure.com", AZURE_OPENAI_API_KEY="k"))
    assert azure.agent.transcription_model is None  # "gpt-transcribe" would name a missing deployment
    notice = azure.transcription_notice()
    assert notice == (
        "input transcription is off: with RELAY_PROVIDER=azure, RELAY_TRANSCRIPTION_MODEL names a "
        "deployment; set it to a transcription deployment to turn transcription on"
    )
    named = Settings.from_env(
        azure_env("https://res.openai.azure.com", AZURE_OPENAI_API_KEY="k", RELAY_TRANSCRIPTION_MODEL="stt")
    )
    assert named.agent.transcription_model == "stt" and named.transcription_notice() is None
    openai = Settings.from_env({"RELAY_INSECURE_DEV": "1"})
    assert openai.agent.transcription_model == models.DEFAULT_TRANSCRIPTION_MODEL == "gpt-transcribe"
    assert openai.transcription_notice() is None
    assert (
        Settings.from_env({"RELAY_INSECURE_DEV": "1", "RELAY_TRANSCRIPTION_MODEL": ""}).agent.transcription_model
        is None
    )


async def test_serve_on_azure_says_once_that_transcription_is_off() -> None:
    proc = RelayProcess(
        "",
        RELAY_PROVIDER="azure",
        AZURE_OPENAI_ENDPOINT="http://127.0.0.1:9",
        AZURE_OPENAI_DEPLOYMENT="rt-prod",
        LOG_LEVEL="info",
    )
    try:
        await proc.start()
        lines = [line for line in proc.lines if line["msg"].startswith("input transcription is off")]
    finally:
        await proc.close()
    assert [line["level"] for line in lines] == ["info"]


def test_a_deprecated_interface_is_named_at_start_up() -> None:
    assert interface_notices(env_settings()) == []
    assert interface_notices(env_settings(OPENAI_REALTIME_DIALECT="beta", OPENAI_REALTIME_URL="wss://rt.example")) == []
    [openai_beta] = interface_notices(env_settings(OPENAI_REALTIME_DIALECT="beta"))
    assert openai_beta.startswith("OPENAI_REALTIME_DIALECT=beta: api.openai.com refuses the beta interface")
    preview = Settings.from_env(
        azure_env("https://res.openai.azure.com", OPENAI_REALTIME_DIALECT="beta", AZURE_OPENAI_API_KEY="k")
    )
    [azure_preview] = interface_notices(preview)
    assert "Azure's preview Realtime API" in azure_preview and "deprecated since 2026-04-30" in azure_preview
    ga = Settings.from_env(azure_env("https://res.openai.azure.com", AZURE_OPENAI_API_KEY="k"))
    assert interface_notices(ga) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELAY_PROVIDER": "bedrock"}, "RELAY_PROVIDER must be openai or azure, got 'bedrock'"),
        ({"RELAY_PROVIDER": "azure"}, "AZURE_OPENAI_ENDPOINT is required with RELAY_PROVIDER=azure"),
        (
            {"RELAY_PROVIDER": "azure", "AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com"},
            "AZURE_OPENAI_DEPLOYMENT is required",
        ),
        (
            {**AZURE, "AZURE_OPENAI_ENDPOINT": "http://res.openai.azure.com", "AZURE_OPENAI_DEPLOYMENT": "d"},
            "AZURE_OPENAI_ENDPOINT must use https://",
        ),
        (
            {"RELAY_PROVIDER": "azure", "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com", "OPENAI_REALTIME_URL": "wss://x"},
            "OPENAI_REALTIME_URL is not used with RELAY_PROVIDER=azure",
        ),
        ({"OPENAI_REALTIME_URL": "https://api.openai.com/v1/realtime"}, "OPENAI_REALTIME_URL must be a ws:// or wss://"),
        (
            {**AZURE, "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com/openai/v1", "AZURE_OPENAI_DEPLOYMENT": "d"},
            "AZURE_OPENAI_ENDPOINT is the resource's base URL without a path",
        ),
    ],
)  # fmt: skip
def test_provider_settings_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE_ENV, **env})
    assert str(info.value).startswith(message)


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    inherited = ("RELAY_", "TWILIO_", "OPENAI_", "AZURE_OPENAI_")
    full = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    full.update({"RELAY_INSECURE_DEV": "1", "PORT": str(free_port()), **env})
    return subprocess.run(
        [sys.executable, "-m", "relay", "serve"], env=full, capture_output=True, text=True, timeout=30, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "OPENAI_API_KEY is required"),
        ({"OPENAI_REALTIME_URL": "wss://realtime.example.com/v1/realtime"}, "OPENAI_API_KEY is required"),
        ({"OPENAI_REALTIME_URL": "http://127.0.0.1:9/v1/realtime", "OPENAI_API_KEY": "k"}, "OPENAI_REALTIME_URL"),
        (
            {**AZURE, "AZURE_OPENAI_ENDPOINT": "https://r.openai.azure.com", "AZURE_OPENAI_DEPLOYMENT": "d"},
            "RELAY_PROVIDER=azure needs AZURE_OPENAI_API_KEY or AZURE_OPENAI_AD_TOKEN",
        ),
        ({"OPENAI_API_KEY": "k", "OPENAI_REALTIME_DIALECT": "beta", "RELAY_VOICE": "cedar"}, "RELAY_VOICE: unknown"),
    ],
)  # fmt: skip
def test_serve_refuses_to_start_with_one_line(env: dict[str, str], message: str) -> None:
    result = run_serve(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error: ")
    assert message in lines[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_a_loopback_simulator_needs_no_key(host: str) -> None:
    settings = Settings.from_env({"RELAY_INSECURE_DEV": "1", "OPENAI_REALTIME_URL": f"ws://{host}:8765/v1/realtime"})
    settings.check_credentials()
    assert settings.openai_api_key is None
    remote = Settings.from_env({"RELAY_INSECURE_DEV": "1", "OPENAI_REALTIME_URL": "ws://10.0.0.5:8765/v1/realtime"})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is required"):
        remote.check_credentials()


async def _azure_call(env: dict[str, str]) -> tuple[RealtimeSimulator, Any]:
    sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=400, reply_ms=400))
    await sim.start()
    endpoint = sim.url.removesuffix("/v1/realtime").replace("ws://", "http://")
    settings = relay_settings("", **_from_env_fields(azure_env(endpoint, **env)))
    try:
        async with LocalRelay(settings) as relay:
            caller = make_caller(relay)
            await caller.connect()
            assert await caller.wait_for_audio(400, timeout=5)  # greeting
            await caller.wait_idle(timeout=5)
            await caller.say_and_wait(ulaw.synth_speech(600) + ulaw.silence(800))
            assert await caller.wait_for_audio(800, timeout=5)  # the reply
            await caller.wait_idle(timeout=5)
            await caller.hangup()
            assert await wait_for(lambda: not relay.runtime.calls)
    finally:
        await sim.stop()
    return sim, caller


def _from_env_fields(env: dict[str, str]) -> dict[str, Any]:
    settings = Settings.from_env(env)
    keys = ("provider", "azure_endpoint", "azure_api_key", "azure_ad_token", "azure_api_version", "model", "dialect")
    return {key: getattr(settings, key) for key in keys} | {"agent": settings.agent}


async def test_azure_ga_call_over_real_sockets() -> None:
    sim, caller = await _azure_call({"AZURE_OPENAI_API_KEY": "azure-key-ga-1234", "RELAY_TRANSCRIPTION_MODEL": "stt"})
    assert len(sim.sessions) == 1
    session = sim.sessions[0]
    assert session.path == "/openai/v1/realtime"
    assert session.query == {"model": "rt-prod"}
    assert session.headers["api-key"] == "azure-key-ga-1234"
    assert "authorization" not in session.headers and "openai-beta" not in session.headers
    assert session.dialect == "ga"
    update = session.received[0][1]
    assert update["session"]["model"] == "rt-prod"
    assert update["session"]["audio"]["input"]["transcription"] == {"model": "stt"}  # a deployment name
    for _, event in session.received:
        CLIENT_TYPES["ga"].validate_python(event)
    assert session.turns == 1 and len(session.responses) == 2
    assert session.appended == caller.sent_payloads
    assert not caller.errors


async def test_azure_preview_call_with_an_entra_token_over_real_sockets() -> None:
    sim, caller = await _azure_call(
        {
            "OPENAI_REALTIME_DIALECT": "beta",
            "AZURE_OPENAI_AD_TOKEN": "entra-token-5678",
            "AZURE_OPENAI_API_VERSION": "2025-04-01-preview",
        }
    )
    assert len(sim.sessions) == 1
    session = sim.sessions[0]
    assert session.path == "/openai/realtime"
    assert session.query == {"api-version": "2025-04-01-preview", "deployment": "rt-prod"}
    assert session.headers["authorization"] == "Bearer entra-token-5678"
    assert session.headers["openai-beta"] == "realtime=v1"
    assert "api-key" not in session.headers
    assert session.dialect == "beta"
    for _, event in session.received:
        CLIENT_TYPES["beta"].validate_python(event)
    assert session.received[0][1]["session"]["voice"] == "alloy"
    assert session.turns == 1 and len(session.responses) == 2
    assert not caller.errors
