"""Per-called-number agent profiles: TOML and YAML files, selection by the number called,
start-up validation with clear errors, and remote MCP servers passed through to GA sessions."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import make_caller, relay_settings, wait_for
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter
from tools_support import received

from relay.agent_settings import AgentSettings, DtmfSettings, VadSettings
from relay.config import Settings
from relay.env import ConfigError
from relay.profiles import load_profiles, parse_profiles
from relay.runtime import Runtime
from relay.sim.local import LocalRelay
from relay.sim.realtime import RealtimeSimulator, SimConfig

BASE = AgentSettings(instructions="Environment instructions.", voice="marin")

TOML = """
default_profile = "front_desk"

[profiles.front_desk]
instructions = "You are the front desk of ACME."
voice = "cedar"
tools = ["end_call"]

[profiles.support]
instructions = "You answer for ACME support."
greeting = "Greet the caller as ACME support."
voice = "sage"
speed = 1.1
tools = ["lookup_order", "transfer_call", "end_call"]
transfer_numbers = { billing = "+15550003333", sales = "+1 555 000 4444" }
whisper_summary = true
noise_reduction = "far_field"

[profiles.support.vad]
type = "semantic_vad"
eagerness = "low"

[[profiles.support.mcp_servers]]
server_label = "crm"
server_url = "https://crm.example.com/mcp"
server_description = "Customer records"
allowed_tools = ["find_customer"]
authorization_env = "CRM_MCP_TOKEN"

[numbers]
"+15550002222" = "support"
"+15550007777" = "front_desk"
"""

YAML = """
default_profile: front_desk
profiles:
  front_desk:
    instructions: You are the front desk of ACME.
    voice: cedar
    tools: [end_call]
  support:
    instructions: You answer for ACME support.
    greeting: Greet the caller as ACME support.
    voice: sage
    speed: 1.1
    tools: [lookup_order, transfer_call, end_call]
    transfer_numbers: {billing: "+15550003333", sales: "+1 555 000 4444"}
    whisper_summary: true
    noise_reduction: far_field
    vad: {type: semantic_vad, eagerness: low}
    mcp_servers:
      - server_label: crm
        server_url: https://crm.example.com/mcp
        server_description: Customer records
        allowed_tools: [find_customer]
        authorization_env: CRM_MCP_TOKEN
numbers:
  "+15550002222": support
  "+15550007777": front_desk
"""

ENV = {"CRM_MCP_TOKEN": "crm-secret-token"}
CRM = {
    "type": "mcp",
    "server_label": "crm",
    "server_url": "https://crm.example.com/mcp",
    "require_approval": "never",
    "server_description": "Customer records",
    "allowed_tools": ["find_customer"],
    "authorization": "crm-secret-token",
}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_toml_and_yaml_files_load_to_the_same_profiles(tmp_path: Path) -> None:
    from_toml = load_profiles(write(tmp_path, "p.toml", TOML), BASE, ENV)
    from_yaml = load_profiles(write(tmp_path, "p.yaml", YAML), BASE, ENV)
    assert from_toml == from_yaml
    support = from_toml.for_number("+15550002222")
    assert support == dataclasses.replace(
        BASE,
        name="support",
        instructions="You answer for ACME support.",
        greeting="Greet the caller as ACME support.",
        voice="sage",
        speed=1.1,
        vad=VadSettings(type="semantic_vad", eagerness="low"),
        tools=("lookup_order", "transfer_call", "end_call"),
        transfer_numbers={"billing": "+15550003333", "sales": "+15550004444"},
        whisper_summary=True,
        noise_reduction="far_field",
        mcp_servers=(CRM,),
    )
    front = from_toml.for_number("+15550007777")
    assert (front.name, front.voice, front.tools) == ("front_desk", "cedar", ("end_call",))
    assert front.greeting == BASE.greeting
    # any other number: the default profile; without a default_profile: the environment's agent
    assert from_toml.for_number("+15559990000") is from_toml.by_name["front_desk"]
    no_default = parse_profiles({"profiles": {"a": {"voice": "ash"}}, "numbers": {"+15550001234": "a"}}, BASE)
    assert no_default.for_number("+15559990000") is BASE
    assert load_profiles(None, BASE).for_number("+15550002222") is BASE


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"profile": {}}, "unknown top-level keys ['profile']"),
        ({"profiles": {"a": {"instruction": "typo"}}}, "profiles.a: unknown key 'instruction'"),
        ({"profiles": {"a": {"vad": {"silence_ms": 300}}}}, "profiles.a.vad: unknown key 'silence_ms'"),
        ({"profiles": {"a": {"voice": 3}}}, "profiles.a.voice: expected a string, got 3"),
        ({"profiles": {"a": {"speed": "fast"}}}, "profiles.a.speed: expected a number, got 'fast'"),
        ({"profiles": {"a": {"speed": 3.0}}}, "profiles.a.speed must be between 0.25 and 1.5"),
        ({"profiles": {"a": {"whisper_summary": "yes"}}}, "profiles.a.whisper_summary: expected true or false"),
        ({"profiles": {"a": {"vad": {"silence_duration_ms": True}}}}, "vad.silence_duration_ms: expected an integer"),
        ({"profiles": {"a": {"vad": {"type": "loud"}}}}, "profiles.a.vad.type must be server_vad, semantic_vad"),
        ({"profiles": {"a": {"tools": "end_call"}}}, "profiles.a.tools: expected a list"),
        ({"profiles": {"a": {"tools": ["end_call", "end_call"]}}}, "lists end_call more than once"),
        ({"profiles": {"a": {"voice": "robot"}}}, "profiles.a.voice: unknown voice 'robot'"),
        ({"profiles": {"a": {"transfer_numbers": {"sales": "555-1234"}}}}, "transfer_numbers.sales: '555-1234' is not"),
        ({"profiles": {"a": {"transfer_numbers": {"sales": 15550003333}}}}, "write the number as a quoted string"),
        (
            {"profiles": {"a": {"transfer_numbers": {"desk": "sip:desk@"}}}},
            "transfer_numbers.desk: 'sip:desk@' is not a SIP URI like sip:agent@pbx.example.com",
        ),
        (
            {"profiles": {"a": {"transfer_numbers": {"desk": "sip:desk@pbx.example.com>;x=<y"}}}},
            "is not a SIP URI like sip:agent@pbx.example.com",
        ),
        ({"profiles": {"a": {}}, "numbers": {"5550002222": "a"}}, "numbers.5550002222: '5550002222' is not an E.164"),
        ({"profiles": {"a": {}}, "numbers": {15550002222: "a"}}, "read as an integer"),
        ({"profiles": {"a": {}}, "numbers": {"+15550002222": "b"}}, "numbers.+15550002222: profile 'b' is not defined"),
        ({"profiles": {"a": {}}, "numbers": {"+15550002222": ["a"]}}, "profile ['a'] is not defined"),
        ({"profiles": {"a": {}}, "numbers": {"+15550002222": "a", "+1 555 000 2222": "a"}}, "more than once"),
        ({"profiles": {"a": {}}, "default_profile": "z"}, "default_profile 'z' is not defined"),
        ({"profiles": {"a": "hello"}}, "profiles.a: must be a table"),
        (
            {"profiles": {"a": {"mcp_servers": [{"server_label": "crm", "server_url": "http://crm.example.com/mcp"}]}}},
            "profiles.a.mcp_servers[0].server_url must be an https:// URL",
        ),
        (
            {"profiles": {"a": {"mcp_servers": [{"server_url": "https://crm.example.com/mcp"}]}}},
            "mcp_servers[0]: server_label is required",
        ),
        (
            {"profiles": {"a": {"mcp_servers": [{"server_label": "c", "server_url": "https://x", "approval": "no"}]}}},
            "mcp_servers[0]: unknown key 'approval'",
        ),
        (
            {
                "profiles": {
                    "a": {
                        "mcp_servers": [{"server_label": "c", "server_url": "https://x", "require_approval": "always"}]
                    }
                }
            },
            'require_approval must be "never"',
        ),
        (
            {
                "profiles": {
                    "a": {
                        "mcp_servers": [
                            {"server_label": "c", "server_url": "https://x", "authorization_env": "UNSET_TOKEN_VAR"}
                        ]
                    }
                }
            },
            "the environment variable UNSET_TOKEN_VAR is not set",
        ),
        (
            {"profiles": {"a": {"mcp_servers": [{"server_label": "c d", "server_url": "https://x"}]}}},
            "server_label: 'c d' may only contain",
        ),
        ({"profiles": {"a": {"dtmf": {"terminator": "##"}}}}, "profiles.a.dtmf.terminator must be one key"),
        ({"profiles": {"a": {"dtmf": {"timeout_ms": 20}}}}, "profiles.a.dtmf.timeout_ms must be at least 100"),
        ({"profiles": {"a": {"dtmf": {"max_digits": 0}}}}, "profiles.a.dtmf.max_digits must be at least 1"),
        ({"profiles": {"a": {"dtmf": {"interrupt": "no"}}}}, "profiles.a.dtmf.interrupt: expected true or false"),
        ({"profiles": {"a": {"dtmf": {"digits": 4}}}}, "profiles.a.dtmf: unknown key 'digits'"),
    ],
)
def test_validation_errors_name_the_key(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_profiles(document, BASE, {})
    assert message in str(info.value)


def test_keypad_settings_per_profile_and_from_the_environment() -> None:
    document = {"profiles": {"ivr": {"dtmf": {"terminator": "*", "timeout_ms": 1500, "max_digits": 6}}}}
    ivr = parse_profiles(document, BASE, {}).by_name["ivr"]
    assert ivr.dtmf == DtmfSettings(terminator="*", timeout_ms=1500, max_digits=6, interrupt=True)
    quiet = parse_profiles({"profiles": {"q": {"dtmf": {"interrupt": False}}}}, BASE, {}).by_name["q"]
    assert quiet.dtmf == DtmfSettings(interrupt=False)
    env = {"RELAY_INSECURE_DEV": "1"}
    assert Settings.from_env(env).agent.dtmf == DtmfSettings(terminator="#", timeout_ms=2000, max_digits=20)
    custom = Settings.from_env(
        {**env, "RELAY_DTMF_TERMINATOR": "", "RELAY_DTMF_TIMEOUT_MS": "3000", "RELAY_DTMF_MAX_DIGITS": "4"}
    )
    assert custom.agent.dtmf == DtmfSettings(terminator="", timeout_ms=3000, max_digits=4)
    for name, value, message in [
        ("RELAY_DTMF_TERMINATOR", "X", "RELAY_DTMF_TERMINATOR must be one key of 0-9 * # A-D"),
        ("RELAY_DTMF_TIMEOUT_MS", "50", "RELAY_DTMF_TIMEOUT_MS must be >= 100"),
        ("RELAY_DTMF_MAX_DIGITS", "0", "RELAY_DTMF_MAX_DIGITS must be >= 1"),
        ("RELAY_DTMF_INTERRUPT", "maybe", "RELAY_DTMF_INTERRUPT must be a boolean"),
    ]:
        with pytest.raises(ConfigError) as info:
            Settings.from_env({**env, name: value})
        assert message in str(info.value)


def test_the_resumption_line_per_profile_over_the_environments() -> None:
    env = {"RELAY_INSECURE_DEV": "1"}
    assert Settings.from_env(env).agent.resume_line is None
    base = Settings.from_env({**env, "RELAY_RESUME_LINE": "  We are back.  "}).agent
    assert base.resume_line == "We are back."
    own, empty = {"resume_line": "Sorry, the line dropped."}, {"resume_line": ""}
    document = {"profiles": {"own": own, "none": empty, "same": {}}}
    profiles = parse_profiles(document, base, {}).by_name
    assert [profiles[name].resume_line for name in ("own", "none", "same")] == [
        "Sorry, the line dropped.",
        None,
        "We are back.",
    ]
    with pytest.raises(ConfigError) as info:
        parse_profiles({"profiles": {"a": {"resume_line": "x" * 301}}}, base, {})
    assert str(info.value) == "profiles.a.resume_line must be at most 300 characters (it is said as is), got 301"
    with pytest.raises(ConfigError) as info:
        parse_profiles({"profiles": {"a": {"resume_line": 3}}}, base, {})
    assert str(info.value) == "profiles.a.resume_line: expected a string, got 3"
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**env, "RELAY_RESUME_LINE": "y" * 301})
    assert str(info.value) == "RELAY_RESUME_LINE must be at most 300 characters (it is said as is), got 301"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_profiles(write(tmp_path, "p.json", "{}"), BASE)
    with pytest.raises(ConfigError, match="cannot read"):
        load_profiles(str(tmp_path / "missing.toml"), BASE)
    with pytest.raises(ConfigError, match="is not valid"):
        load_profiles(write(tmp_path, "bad.toml", "[profiles.a\n"), BASE)
    with pytest.raises(ConfigError, match="is not valid"):
        load_profiles(write(tmp_path, "bad.yaml", "profiles: [a\n"), BASE)
    # YAML reads an unquoted +1555… as an integer: the error says how to write it
    unquoted = write(tmp_path, "unquoted.yaml", "profiles: {a: {}}\nnumbers:\n  +15550002222: a\n")
    with pytest.raises(ConfigError, match=r"RELAY_PROFILES \(.*unquoted.yaml\): numbers.15550002222: .*quoted"):
        load_profiles(unquoted, BASE)


def test_start_up_refuses_unknown_tools_and_mcp_on_beta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_MCP_TOKEN", "crm-secret-token")
    env = {"RELAY_INSECURE_DEV": "1", "RELAY_PROFILES": write(tmp_path, "p.toml", TOML)}
    runtime = Runtime(Settings.from_env(env))
    assert runtime.profile_for("+15550002222").name == "support"
    with pytest.raises(ConfigError, match=r"profiles\.support\.tools: no tool named 'lookup_order' is loaded"):
        Runtime(Settings.from_env({**env, "RELAY_HANDLERS": "handlers.call_control"}))
    # the beta interface has no cedar: refused at start-up rather than in every call's session.update
    with pytest.raises(ConfigError, match=r"profiles\.front_desk\.voice: unknown voice 'cedar' for the beta dialect"):
        Runtime(Settings.from_env({**env, "OPENAI_REALTIME_DIALECT": "beta"}))
    beta_voices = write(tmp_path, "beta.toml", TOML.replace('voice = "cedar"', 'voice = "verse"'))
    with pytest.raises(ConfigError, match=r"profiles\.support\.mcp_servers: remote MCP servers need the GA"):
        Runtime(Settings.from_env({**env, "RELAY_PROFILES": beta_voices, "OPENAI_REALTIME_DIALECT": "beta"}))
    no_numbers = write(tmp_path, "t.toml", '[profiles.a]\ntools = ["transfer_call"]\n')
    with pytest.raises(ConfigError, match=r"profiles\.a: lists transfer_call but has no transfer_numbers"):
        Runtime(Settings.from_env({**env, "RELAY_PROFILES": no_numbers}))


def test_serve_exits_with_the_error_before_taking_calls(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", '[profiles.a]\nvoice = "robot"\n')
    env = {"PATH": "/usr/bin:/bin", "RELAY_INSECURE_DEV": "1", "RELAY_PROFILES": bad, "PORT": "8000"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"], env=env, capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode != 0
    assert "profiles.a.voice: unknown voice 'robot'" in result.stderr


# ---- the profile of the called number reaches the Realtime session ---------------------------------


async def session_update_for(relay: LocalRelay, sim: RealtimeSimulator, to_number: str) -> list[dict[str, Any]]:
    before = len(sim.sessions)
    caller = make_caller(relay, to_number=to_number)
    await caller.connect()
    assert await wait_for(lambda: len(sim.sessions) > before and len(received(sim.sessions[before])) >= 2)
    await caller.hangup()
    assert await wait_for(lambda: not relay.runtime.calls)
    return received(sim.sessions[before])


async def test_the_called_number_selects_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_MCP_TOKEN", "crm-secret-token")
    sim = RealtimeSimulator(SimConfig(realtime_factor=8.0, greeting_reply_ms=100))
    await sim.start()
    settings = relay_settings(sim.url, profiles_file=write(tmp_path, "p.yaml", YAML))
    validate = TypeAdapter(RealtimeClientEvent).validate_python
    try:
        async with LocalRelay(settings) as relay:
            support = await session_update_for(relay, sim, "+15550002222")
            other = await session_update_for(relay, sim, "+15559990000")
    finally:
        await sim.stop()

    update = support[0]
    assert update["type"] == "session.update"
    validate(update)
    session = update["session"]
    assert session["instructions"] == "You answer for ACME support."
    assert session["audio"]["output"]["voice"] == "sage"
    assert session["audio"]["output"]["speed"] == 1.1
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad",
        "eagerness": "low",
        "create_response": True,
        "interrupt_response": True,
    }
    assert session["audio"]["input"]["noise_reduction"] == {"type": "far_field"}
    functions = [t for t in session["tools"] if t["type"] == "function"]
    assert [t["name"] for t in functions] == ["lookup_order", "transfer_call", "end_call"]
    assert [t for t in session["tools"] if t["type"] == "mcp"] == [CRM]
    greeting = support[1]
    assert greeting["type"] == "response.create"
    # the greeting is spoken in the profile's persona: its instructions, then the greeting instruction
    assert greeting["response"]["instructions"] == "You answer for ACME support.\n\nGreet the caller as ACME support."
    # an unknown number gets the default profile: its instructions, voice and tools only
    default_session = other[0]["session"]
    validate(other[0])
    assert default_session["instructions"] == "You are the front desk of ACME."
    assert default_session["audio"]["output"]["voice"] == "cedar"
    assert [t["name"] for t in default_session["tools"]] == ["end_call"]
    # the sessions were accepted as configured
    assert all(e["type"] != "error" for s in sim.sessions for e in s.sent)


def test_a_transfer_destination_may_be_a_sip_uri(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[profiles.a]\ntransfer_numbers = { desk = "sip:desk@pbx.example.com:5061;transport=tls", '
        'billing = "+15550003333" }\n',
        encoding="utf-8",
    )
    profile = load_profiles(str(path), BASE).by_name["a"]
    assert dict(profile.transfer_numbers) == {
        "desk": "sip:desk@pbx.example.com:5061;transport=tls",
        "billing": "+15550003333",
    }
