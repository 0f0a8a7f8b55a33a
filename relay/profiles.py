"""Per-called-number agent profiles from a TOML or YAML file (``RELAY_PROFILES``).

    default_profile = "support"          # optional; else "default", else the environment's agent
    [profiles.support]
    instructions = "You answer for ACME support…"
    greeting = "Greet the caller as ACME support."
    voice = "marin"
    tools = ["lookup_order", "end_call", "transfer_call"]
    transfer_numbers = { billing = "+15550003333" }
    [profiles.support.vad]
    type = "semantic_vad"
    eagerness = "low"
    [[profiles.support.mcp_servers]]
    server_label = "crm"
    server_url = "https://crm.example.com/mcp"
    require_approval = "never"
    [numbers]
    "+15550002222" = "support"

Unknown keys, wrong types and references to missing profiles or tools are start-up errors.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from relay.config import GA_VOICES, AgentSettings, ConfigError

_PROFILE_KEYS = {
    "instructions": str,
    "greeting": str,
    "voice": str,
    "speed": (int, float),
    "tools": list,
    "transfer_numbers": dict,
    "allow_any_transfer_number": bool,
    "whisper_summary": bool,
    "transcription_model": str,
    "noise_reduction": str,
    "vad": dict,
    "mcp_servers": list,
}
_VAD_KEYS = {
    "type": str,
    "threshold": (int, float),
    "prefix_padding_ms": int,
    "silence_duration_ms": int,
    "eagerness": str,
    "create_response": bool,
    "interrupt_response": bool,
    "idle_timeout_ms": int,
}


def _check_keys(where: str, data: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        expected = allowed[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key}: expected {getattr(expected, '__name__', expected)}, got {value!r}")


def _e164(number: str, where: str) -> str:
    cleaned = number.replace(" ", "").replace("-", "")
    if not (cleaned.startswith("+") and cleaned[1:].isdigit() and 8 <= len(cleaned) <= 16):
        raise ConfigError(f"{where}: {number!r} is not an E.164 number like +15550001111")
    return cleaned


def _profile(name: str, data: Mapping[str, Any], base: AgentSettings) -> AgentSettings:
    where = f"profiles.{name}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table")
    _check_keys(where, data, _PROFILE_KEYS)
    vad = base.vad
    if "vad" in data:
        _check_keys(f"{where}.vad", data["vad"], _VAD_KEYS)
        vad = replace(vad, **data["vad"])
        if vad.type not in ("server_vad", "semantic_vad", "none"):
            raise ConfigError(f"{where}.vad.type must be server_vad, semantic_vad or none")
        if vad.eagerness not in ("low", "medium", "high", "auto"):
            raise ConfigError(f"{where}.vad.eagerness must be low, medium, high or auto")
        if not 0.0 <= vad.threshold <= 1.0:
            raise ConfigError(f"{where}.vad.threshold must be between 0 and 1")
    voice = data.get("voice", base.voice)
    if voice not in GA_VOICES and not voice.startswith("voice_"):
        raise ConfigError(f"{where}.voice: unknown voice {voice!r} (one of {', '.join(GA_VOICES)} or a custom id)")
    tools = data.get("tools")
    if tools is not None and not all(isinstance(t, str) for t in tools):
        raise ConfigError(f"{where}.tools must be a list of tool names")
    transfers = {
        str(k): _e164(str(v), f"{where}.transfer_numbers.{k}") for k, v in data.get("transfer_numbers", {}).items()
    }
    mcp: list[Mapping[str, Any]] = []
    for i, server in enumerate(data.get("mcp_servers", [])):
        if not isinstance(server, Mapping) or not server.get("server_label") or not server.get("server_url"):
            raise ConfigError(f"{where}.mcp_servers[{i}]: server_label and server_url are required")
        url = str(server["server_url"])
        if not url.startswith("https://"):
            raise ConfigError(f"{where}.mcp_servers[{i}].server_url must be https://")
        mcp.append({"type": "mcp", **dict(server)})
    noise = data.get("noise_reduction", base.noise_reduction)
    if noise not in (None, "near_field", "far_field", "off"):
        raise ConfigError(f"{where}.noise_reduction must be near_field, far_field or off")
    return replace(
        base,
        name=name,
        instructions=data.get("instructions", base.instructions),
        greeting=data.get("greeting", base.greeting) or None,
        voice=voice,
        speed=float(data.get("speed", base.speed)),
        vad=vad,
        tools=tuple(tools) if tools is not None else base.tools,
        transfer_numbers=transfers or dict(base.transfer_numbers),
        allow_any_transfer_number=data.get("allow_any_transfer_number", base.allow_any_transfer_number),
        whisper_summary=data.get("whisper_summary", base.whisper_summary),
        transcription_model=data.get("transcription_model", base.transcription_model),
        noise_reduction=None if noise == "off" else noise,
        mcp_servers=tuple(mcp),
    )


@dataclass(frozen=True)
class Profiles:
    default: AgentSettings
    by_number: Mapping[str, AgentSettings]
    by_name: Mapping[str, AgentSettings]

    def for_number(self, number: str) -> AgentSettings:
        return self.by_number.get(number.replace(" ", "").replace("-", ""), self.default)

    def check_tools(self, known: Iterable[str]) -> None:
        names = set(known)
        for profile in self.by_name.values():
            for tool_name in profile.tools or ():
                if tool_name not in names:
                    raise ConfigError(
                        f"profiles.{profile.name}.tools: no tool named {tool_name!r} is loaded "
                        f"(loaded: {', '.join(sorted(names)) or 'none'})"
                    )


def parse_profiles(data: Mapping[str, Any], base: AgentSettings) -> Profiles:
    if not isinstance(data, Mapping):
        raise ConfigError("profiles file: top level must be a table/mapping")
    unknown = set(data) - {"profiles", "numbers", "default_profile"}
    if unknown:
        raise ConfigError(f"profiles file: unknown top-level keys {sorted(unknown)}")
    raw_profiles = data.get("profiles", {})
    if not isinstance(raw_profiles, Mapping):
        raise ConfigError("profiles must be a table of named profiles")
    by_name = {str(name): _profile(str(name), body, base) for name, body in raw_profiles.items()}
    default_name = data.get("default_profile") or ("default" if "default" in by_name else None)
    if default_name is not None and default_name not in by_name:
        raise ConfigError(f"default_profile {default_name!r} is not defined under [profiles]")
    default = by_name[default_name] if default_name else base
    numbers = data.get("numbers", {})
    if not isinstance(numbers, Mapping):
        raise ConfigError("numbers must map E.164 numbers to profile names")
    by_number: dict[str, AgentSettings] = {}
    for number, profile_name in numbers.items():
        key = _e164(str(number), "numbers")
        if profile_name not in by_name:
            raise ConfigError(f"numbers.{number}: profile {profile_name!r} is not defined")
        by_number[key] = by_name[profile_name]
    return Profiles(default=default, by_number=by_number, by_name=by_name)


def load_profiles(path: str | None, base: AgentSettings) -> Profiles:
    if not path:
        return Profiles(default=base, by_number={}, by_name={})
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"RELAY_PROFILES: cannot read {path}: {exc.strerror}") from None
    try:
        if file.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        elif file.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"RELAY_PROFILES: {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"RELAY_PROFILES: {path} is not valid: {exc}") from None
    return parse_profiles(data, base)
