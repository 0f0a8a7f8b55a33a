"""Per-called-number agent profiles from a TOML or YAML file (``RELAY_PROFILES``).

A profile says what the assistant is on one phone number: instructions, greeting, voice,
which tools the model is offered, VAD settings, transfer destinations and remote MCP servers.
Every profile starts from the environment's agent settings (``RELAY_INSTRUCTIONS``,
``RELAY_VOICE``…) and overrides what it names. ``[numbers]`` maps called numbers (E.164, the
``To`` of the call) to profile names; a call to any other number gets the default profile
(``default_profile``, else a profile named ``default``, else the environment's agent)::

    default_profile = "support"
    [profiles.support]
    instructions = "You answer for ACME support…"
    greeting = "Greet the caller as ACME support."      # "" = no greeting, wait for the caller
    resume_line = "Sorry, the line dropped for a moment."  # said as is when a call resumes; "" = nothing
    voice = "marin"                       # beta dialect: alloy, ash, ballad, coral, echo, sage, shimmer, verse
    speed = 1.0                           # 0.25 to 1.5
    model = "gpt-realtime-2.1"            # omitted = OPENAI_REALTIME_MODEL (on Azure: a deployment name)
    tools = ["lookup_order", "end_call", "transfer_call"]  # omitted = every loaded tool
    transfer_numbers = { billing = "+15550003333", desk = "sip:desk@pbx.example.com" }
    allow_any_transfer_number = false     # true: the model may also dial an E.164 number it was told
    whisper_summary = true                # the human hears a short summary before being connected
    allow_sip_profile_header = false      # SIP mode: true lets an X-Relay-Profile SIP header pick this profile
    transcription_model = "gpt-transcribe"
    noise_reduction = "near_field"        # or far_field, off
    webhook_url = "https://crm.example.com/hooks/relay"  # post-call webhook for this number ("" = none)
    [profiles.support.vad]
    type = "semantic_vad"                 # server_vad, semantic_vad or none
    eagerness = "low"
    create_response = true                # false: the relay asks for each answer after the turn is committed
    [profiles.support.dtmf]               # key presses are collected into one entry
    terminator = "#"                      # ends an entry ("" = none)
    timeout_ms = 2000                     # so does this pause after the last key
    max_digits = 20                       # and this many keys
    interrupt = true                      # a key press cuts the assistant off, like speech
    outbound_greeting = "Introduce yourself as ACME and say why you are calling."  # POST /calls
    recording = "dual"                    # or off; omitted = RELAY_RECORDING
    recording_disclosure = "This call is recorded."  # said first while recording
    [[profiles.support.mcp_servers]]
    server_label = "crm"
    server_url = "https://crm.example.com/mcp"
    authorization_env = "CRM_MCP_TOKEN"   # read from the environment at start-up
    allowed_tools = ["find_customer"]
    [numbers]
    "+15550002222" = "support"

The same structure works in YAML (quote the numbers: YAML reads ``+15550002222`` as an integer).

Remote MCP servers (GA only). Each ``mcp_servers`` entry is passed through as a GA session tool
``{"type": "mcp", …}``: the Realtime API itself lists and calls the server's tools; the relay
runs nothing. Accepted keys: ``server_label`` (required; letters, digits, ``_``, ``-``),
``server_url`` (required, ``https://``), ``server_description``, ``allowed_tools``, ``headers``,
``authorization`` or ``authorization_env`` (the name of an environment variable holding the
token, so secrets stay out of the file) and ``require_approval``. A phone relay has nobody to
approve a call, so ``require_approval`` must be ``"never"`` (the default written for you).
The beta dialect has no MCP tools: a profile with ``mcp_servers`` under
``OPENAI_REALTIME_DIALECT=beta`` is a start-up error (``Profiles.check_dialect``), not a
silent drop, so a deployment never loses tools it was configured with.

Unknown keys, wrong types, bad numbers, references to missing profiles or tools and
non-https MCP URLs are start-up errors naming the exact key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from relay.agent_settings import AgentSettings, check_dtmf, check_resume_line, check_voice
from relay.env import ConfigError, read_http_url

_NUMBER = (int, float)
_PROFILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "instructions": str,
    "greeting": str,
    "resume_line": str,
    "voice": str,
    "speed": _NUMBER,
    "model": str,
    "tools": list,
    "transfer_numbers": dict,
    "allow_any_transfer_number": bool,
    "whisper_summary": bool,
    "allow_sip_profile_header": bool,
    "transcription_model": str,
    "noise_reduction": str,
    "vad": dict,
    "dtmf": dict,
    "mcp_servers": list,
    "outbound_greeting": str,
    "recording": str,
    "recording_disclosure": str,
    "webhook_url": str,
}
_VAD_KEYS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "threshold": _NUMBER,
    "prefix_padding_ms": int,
    "silence_duration_ms": int,
    "eagerness": str,
    "create_response": bool,
    "interrupt_response": bool,
    "idle_timeout_ms": int,
}
_DTMF_KEYS: dict[str, type | tuple[type, ...]] = {
    "terminator": str,
    "timeout_ms": int,
    "max_digits": int,
    "interrupt": bool,
}
_MCP_KEYS: dict[str, type | tuple[type, ...]] = {
    "server_label": str,
    "server_url": str,
    "server_description": str,
    "allowed_tools": list,
    "headers": dict,
    "authorization": str,
    "authorization_env": str,
    "require_approval": str,
}
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIP_URI = re.compile(
    r"sip:[A-Za-z0-9._+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,10}(?::[0-9]{1,5})?(?:;transport=(?:tls|tcp|udp))?"
)
MAX_LINE_CHARS = 1000  # a spoken line (outbound greeting, recording disclosure)


def _type_name(expected: type | tuple[type, ...]) -> str:
    if expected == _NUMBER:
        return "a number"
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table/mapping"}
    if isinstance(expected, tuple):
        return " or ".join(names.get(t, t.__name__) for t in expected)
    return names.get(expected, expected.__name__)


def _check_keys(where: str, data: Mapping[str, Any], allowed: Mapping[str, type | tuple[type, ...]]) -> None:
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        expected = allowed[key]
        wrong_bool = isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,))
        if not isinstance(value, expected) or wrong_bool:
            raise ConfigError(f"{where}.{key}: expected {_type_name(expected)}, got {value!r}")


def _e164(number: Any, where: str) -> str:
    if isinstance(number, int) and not isinstance(number, bool):
        raise ConfigError(
            f'{where}: {number!r} was read as an integer; write the number as a quoted string like "+{number}"'
        )
    if not isinstance(number, str):
        raise ConfigError(f'{where}: expected an E.164 number like "+15550001111", got {number!r}')
    cleaned = number.replace(" ", "").replace("-", "")
    if not (cleaned.startswith("+") and cleaned[1:].isdigit() and cleaned[1] != "0" and 8 <= len(cleaned) <= 16):
        raise ConfigError(f"{where}: {number!r} is not an E.164 number like +15550001111")
    return cleaned


def _destination(value: Any, where: str) -> str:
    """A transfer destination: an E.164 number, or a SIP URI (``sip:agent@pbx.example.com``, with an
    optional port and transport), dialled as such on Media Streams and referred to over SIP."""
    if isinstance(value, str) and value.startswith("sip:"):
        if not _SIP_URI.fullmatch(value):
            raise ConfigError(f"{where}: {value[:80]!r} is not a SIP URI like sip:agent@pbx.example.com")
        return value
    return _e164(value, where)


def _mcp_server(where: str, server: Any, env: Mapping[str, str]) -> dict[str, Any]:
    if not isinstance(server, Mapping):
        raise ConfigError(f"{where}: must be a table with server_label and server_url")
    _check_keys(where, server, _MCP_KEYS)
    for required in ("server_label", "server_url"):
        if not server.get(required):
            raise ConfigError(f"{where}: {required} is required")
    label = server["server_label"]
    if not _LABEL.fullmatch(label):
        raise ConfigError(f"{where}.server_label: {label!r} may only contain letters, digits, '_' and '-'")
    url = server["server_url"]
    if not url.startswith("https://") or len(url) <= len("https://"):
        raise ConfigError(f"{where}.server_url must be an https:// URL, got {url!r}")
    approval = server.get("require_approval", "never")
    if approval != "never":
        raise ConfigError(
            f'{where}.require_approval must be "never": nobody on a phone call can approve MCP tool calls '
            "(limit the server's tools with allowed_tools instead)"
        )
    if not all(isinstance(name, str) for name in server.get("allowed_tools", [])):
        raise ConfigError(f"{where}.allowed_tools must be a list of tool names")
    headers = server.get("headers", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ConfigError(f"{where}.headers must map header names to strings")
    if "authorization" in server and "authorization_env" in server:
        raise ConfigError(f"{where}: set authorization or authorization_env, not both")
    entry: dict[str, Any] = {"type": "mcp", "server_label": label, "server_url": url, "require_approval": "never"}
    for key in ("server_description", "allowed_tools", "headers", "authorization"):
        if key in server:
            entry[key] = server[key]
    if "authorization_env" in server:
        variable = server["authorization_env"]
        token = env.get(variable)
        if not token:
            raise ConfigError(f"{where}.authorization_env: the environment variable {variable} is not set")
        entry["authorization"] = token
    return entry


def _profile(name: str, data: Any, base: AgentSettings, env: Mapping[str, str], dialect: str) -> AgentSettings:
    where = f"profiles.{name}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(where, data, _PROFILE_KEYS)
    vad = base.vad
    if "vad" in data:
        _check_keys(f"{where}.vad", data["vad"], _VAD_KEYS)
        vad = replace(vad, **data["vad"])
        if vad.type not in ("server_vad", "semantic_vad", "none"):
            raise ConfigError(f"{where}.vad.type must be server_vad, semantic_vad or none, got {vad.type!r}")
        if vad.eagerness not in ("low", "medium", "high", "auto"):
            raise ConfigError(f"{where}.vad.eagerness must be low, medium, high or auto, got {vad.eagerness!r}")
        if not 0.0 <= vad.threshold <= 1.0:
            raise ConfigError(f"{where}.vad.threshold must be between 0 and 1")
    dtmf = base.dtmf
    if "dtmf" in data:
        _check_keys(f"{where}.dtmf", data["dtmf"], _DTMF_KEYS)
        dtmf = replace(dtmf, **data["dtmf"])
        check_dtmf(dtmf, {key: f"{where}.dtmf.{key}" for key in _DTMF_KEYS})
    voice = data.get("voice", base.voice)
    speed = data.get("speed", base.speed)
    check_voice(dialect, voice, speed, voice_key=f"{where}.voice", speed_key=f"{where}.speed")
    model = data.get("model", base.model)
    if model is not None and not model.strip():
        raise ConfigError(f"{where}.model must name a model (omit it to use OPENAI_REALTIME_MODEL)")
    tools = data.get("tools")
    if tools is not None:
        if not all(isinstance(t, str) for t in tools):
            raise ConfigError(f"{where}.tools must be a list of tool names")
        duplicates = sorted({t for t in tools if tools.count(t) > 1})
        if duplicates:
            raise ConfigError(f"{where}.tools lists {', '.join(duplicates)} more than once")
    transfers = {
        str(k): _destination(v, f"{where}.transfer_numbers.{k}") for k, v in data.get("transfer_numbers", {}).items()
    }
    mcp = [_mcp_server(f"{where}.mcp_servers[{i}]", s, env) for i, s in enumerate(data.get("mcp_servers", []))]
    labels = [server["server_label"] for server in mcp]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}.mcp_servers: server_label values must be unique")
    recording = data.get("recording", base.recording)
    if recording not in (None, "off", "dual"):
        raise ConfigError(f"{where}.recording must be off or dual, got {recording!r}")
    for key in ("outbound_greeting", "recording_disclosure"):
        if len(data.get(key, "")) > MAX_LINE_CHARS:
            raise ConfigError(f"{where}.{key} is longer than {MAX_LINE_CHARS} characters")
    resume_line = data.get("resume_line", base.resume_line or "").strip()
    check_resume_line(resume_line, f"{where}.resume_line")
    webhook_url = base.webhook_url
    if "webhook_url" in data:
        raw_url = data["webhook_url"]
        webhook_url = read_http_url(raw_url, f"{where}.webhook_url") if raw_url.strip() else ""
    noise = data.get("noise_reduction", base.noise_reduction)
    if noise not in (None, "near_field", "far_field", "off"):
        raise ConfigError(f"{where}.noise_reduction must be near_field, far_field or off, got {noise!r}")
    return replace(
        base,
        name=name,
        instructions=data.get("instructions", base.instructions),
        greeting=data.get("greeting", base.greeting) or None,
        resume_line=resume_line or None,
        voice=voice,
        speed=float(speed),
        vad=vad,
        dtmf=dtmf,
        tools=tuple(tools) if tools is not None else base.tools,
        transfer_numbers=transfers or dict(base.transfer_numbers),
        allow_any_transfer_number=data.get("allow_any_transfer_number", base.allow_any_transfer_number),
        whisper_summary=data.get("whisper_summary", base.whisper_summary),
        allow_sip_profile_header=data.get("allow_sip_profile_header", base.allow_sip_profile_header),
        transcription_model=data.get("transcription_model", base.transcription_model),
        noise_reduction=None if noise == "off" else noise,
        mcp_servers=tuple(mcp) if "mcp_servers" in data else base.mcp_servers,
        model=model,
        outbound_greeting=data.get("outbound_greeting", base.outbound_greeting),
        recording=recording,
        recording_disclosure=data.get("recording_disclosure", base.recording_disclosure) or None,
        webhook_url=webhook_url,
    )


@dataclass(frozen=True)
class Profiles:
    default: AgentSettings
    by_number: Mapping[str, AgentSettings]
    by_name: Mapping[str, AgentSettings]

    def for_number(self, number: str) -> AgentSettings:
        return self.by_number.get(number.replace(" ", "").replace("-", ""), self.default)

    def _all(self) -> list[AgentSettings]:
        return [*self.by_name.values(), self.default]

    def check_tools(self, known: Iterable[str]) -> None:
        """Every tool a profile names must be loaded (RELAY_HANDLERS); transfers need somewhere to go."""
        names = set(known)
        for profile in self._all():
            for tool_name in profile.tools or ():
                if tool_name not in names:
                    raise ConfigError(
                        f"profiles.{profile.name}.tools: no tool named {tool_name!r} is loaded "
                        f"(loaded: {', '.join(sorted(names)) or 'none'}; see RELAY_HANDLERS)"
                    )
            if (
                profile.tools is not None
                and "transfer_call" in profile.tools
                and not profile.transfer_numbers
                and not profile.allow_any_transfer_number
            ):
                raise ConfigError(
                    f"profiles.{profile.name}: lists transfer_call but has no transfer_numbers "
                    "(and allow_any_transfer_number is false)"
                )

    def check_webhooks(self, has_secret: bool) -> None:
        """A profile's webhook_url is signed with RELAY_WEBHOOK_SECRET: without it, refuse to start."""
        if has_secret:
            return
        for profile in self._all():
            if profile.webhook_url:
                raise ConfigError(
                    f"profiles.{profile.name}.webhook_url needs RELAY_WEBHOOK_SECRET to sign the deliveries with"
                )

    def check_dialect(self, dialect: str) -> None:
        """Voices and speeds must exist in the dialect; MCP servers exist only in GA: refuse to start
        rather than have every call's ``session.update`` refused or tools silently dropped."""
        for profile in self._all():
            check_voice(
                dialect,
                profile.voice,
                profile.speed,
                voice_key=f"profiles.{profile.name}.voice",
                speed_key=f"profiles.{profile.name}.speed",
            )
        if dialect == "ga":
            return
        for profile in self._all():
            if profile.mcp_servers:
                raise ConfigError(
                    f"profiles.{profile.name}.mcp_servers: remote MCP servers need the GA Realtime API; "
                    f"OPENAI_REALTIME_DIALECT={dialect} has no MCP tools (remove them or use ga)"
                )


def parse_profiles(
    data: Any, base: AgentSettings, env: Mapping[str, str] | None = None, *, dialect: str = "ga"
) -> Profiles:
    env = os.environ if env is None else env
    if not isinstance(data, Mapping):
        raise ConfigError("profiles file: top level must be a table/mapping")
    unknown = set(data) - {"profiles", "numbers", "default_profile"}
    if unknown:
        raise ConfigError(
            f"profiles file: unknown top-level keys {sorted(unknown)} (allowed: default_profile, numbers, profiles)"
        )
    raw_profiles = data.get("profiles", {})
    if not isinstance(raw_profiles, Mapping):
        raise ConfigError("profiles must be a table of named profiles")
    by_name = {str(name): _profile(str(name), body, base, env, dialect) for name, body in raw_profiles.items()}
    default_name = data.get("default_profile") or ("default" if "default" in by_name else None)
    if default_name is not None and (not isinstance(default_name, str) or default_name not in by_name):
        raise ConfigError(
            f"default_profile {default_name!r} is not defined under [profiles] "
            f"(defined: {', '.join(sorted(by_name)) or 'none'})"
        )
    default = by_name[default_name] if default_name else base
    numbers = data.get("numbers", {})
    if not isinstance(numbers, Mapping):
        raise ConfigError("numbers must map E.164 numbers to profile names")
    by_number: dict[str, AgentSettings] = {}
    for number, profile_name in numbers.items():
        key = _e164(number, f"numbers.{number}")
        if not isinstance(profile_name, str) or profile_name not in by_name:
            raise ConfigError(
                f"numbers.{number}: profile {profile_name!r} is not defined "
                f"(defined: {', '.join(sorted(by_name)) or 'none'})"
            )
        if key in by_number:
            raise ConfigError(f"numbers.{number}: {key} is listed more than once")
        by_number[key] = by_name[profile_name]
    return Profiles(default=default, by_number=by_number, by_name=by_name)


def load_profiles(
    path: str | None, base: AgentSettings, env: Mapping[str, str] | None = None, *, dialect: str = "ga"
) -> Profiles:
    if not path:
        return Profiles(default=base, by_number={}, by_name={})
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"RELAY_PROFILES: {path} must end in .toml, .yaml or .yml")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"RELAY_PROFILES: cannot read {path}: {exc.strerror}") from None
    try:
        data: Any = tomllib.loads(text) if suffix == ".toml" else (yaml.safe_load(text) or {})
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"RELAY_PROFILES: {path} is not valid: {exc}") from None
    try:
        return parse_profiles(data, base, env, dialect=dialect)
    except ConfigError as exc:
        raise ConfigError(f"RELAY_PROFILES ({path}): {exc}") from None
