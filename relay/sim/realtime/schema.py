"""What a ``session.update`` may contain, per dialect, and the audio formats and voices the service names.

The simulator is as strict as the service: a field the dialect does not declare, at any depth, is
refused with ``unknown_parameter``, and an unknown ``type`` of a discriminated object with
``invalid_value`` (/work/shared/PROTOCOLS.md §7, §10). The field tables equal the ``openai``
package's session types (a test keeps them equal; this module never imports ``openai``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from relay.sim.realtime.errors import Problem, supported
from relay.sim.realtime.wire import Dialect

# Voices each interface has (openai types/realtime/realtime_audio_config_output.py and
# types/beta/realtime/session_update_event.py), listed here apart from the relay's own table so
# the simulator checks the relay instead of mirroring it.
GA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
BETA_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse")


@dataclass(frozen=True)
class OneOf:
    """An object whose allowed fields depend on its ``type`` (a discriminated union in the API schema)."""

    type_required: bool
    by_type: dict[str, dict[str, Any]]


FieldShape = dict[str, Any] | OneOf | None
"""``None``: any value; a dict: an object with exactly these optional fields; ``OneOf``: chosen by ``type``.
A shape applies to an object value or to every object in a list value; other values are not inspected."""

SESSION_FIELDS: dict[Dialect, dict[str, FieldShape]] = {
    # The session fields each dialect accepts, as the ``openai`` package declares them: GA
    # ``RealtimeSessionCreateRequest``, beta ``session_update_event.Session`` (a test keeps them equal).
    "ga": {
        "audio": {
            "input": {
                "format": OneOf(
                    False,
                    {
                        "audio/pcm": {"rate": None, "type": None},
                        "audio/pcma": {"type": None},
                        "audio/pcmu": {"type": None},
                    },
                ),
                "noise_reduction": OneOf(
                    False,
                    {"far_field": {"strength": None, "type": None}, "near_field": {"strength": None, "type": None}},
                ),
                "transcription": {
                    "delay": None,
                    "keywords": None,
                    "language": None,
                    "languages": None,
                    "model": None,
                    "prompt": None,
                },
                "turn_detection": OneOf(
                    True,
                    {
                        "semantic_vad": {
                            "create_response": None,
                            "eagerness": None,
                            "interrupt_response": None,
                            "type": None,
                        },
                        "server_vad": {
                            "create_response": None,
                            "idle_timeout_ms": None,
                            "interrupt_response": None,
                            "prefix_padding_ms": None,
                            "silence_duration_ms": None,
                            "threshold": None,
                            "type": None,
                        },
                    },
                ),
            },
            "output": {
                "format": OneOf(
                    False,
                    {
                        "audio/pcm": {"rate": None, "type": None},
                        "audio/pcma": {"type": None},
                        "audio/pcmu": {"type": None},
                    },
                ),
                "speed": None,
                "voice": {"id": None},
            },
        },
        "include": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": None,
        "output_modalities": None,
        "parallel_tool_calls": None,
        "prompt": {"id": None, "variables": None, "version": None},
        "reasoning": {"effort": None},
        "tool_choice": OneOf(
            True, {"function": {"name": None, "type": None}, "mcp": {"name": None, "server_label": None, "type": None}}
        ),
        "tools": OneOf(
            False,
            {
                "function": {"description": None, "name": None, "parameters": None, "type": None},
                "mcp": {
                    "allowed_callers": None,
                    "allowed_tools": {"read_only": None, "tool_names": None},
                    "authorization": None,
                    "connector_id": None,
                    "defer_loading": None,
                    "headers": None,
                    "require_approval": {
                        "always": {"read_only": None, "tool_names": None},
                        "never": {"read_only": None, "tool_names": None},
                    },
                    "server_description": None,
                    "server_label": None,
                    "server_url": None,
                    "tunnel_id": None,
                    "type": None,
                },
            },
        ),
        "tracing": {"group_id": None, "metadata": None, "workflow_name": None},
        "truncation": OneOf(
            True,
            {"retention_ratio": {"retention_ratio": None, "token_limits": {"post_instructions": None}, "type": None}},
        ),
        "type": None,
    },
    "beta": {
        "client_secret": {"expires_after": {"anchor": None, "seconds": None}},
        "input_audio_format": None,
        "input_audio_noise_reduction": OneOf(False, {"far_field": {"type": None}, "near_field": {"type": None}}),
        "input_audio_transcription": {"language": None, "model": None, "prompt": None},
        "instructions": None,
        "max_response_output_tokens": None,
        "modalities": None,
        "model": None,
        "output_audio_format": None,
        "speed": None,
        "temperature": None,
        "tool_choice": None,
        "tools": OneOf(False, {"function": {"description": None, "name": None, "parameters": None, "type": None}}),
        "tracing": {"group_id": None, "metadata": None, "workflow_name": None},
        "turn_detection": OneOf(
            False,
            {
                "semantic_vad": {
                    "create_response": None,
                    "eagerness": None,
                    "interrupt_response": None,
                    "prefix_padding_ms": None,
                    "silence_duration_ms": None,
                    "threshold": None,
                    "type": None,
                },
                "server_vad": {
                    "create_response": None,
                    "eagerness": None,
                    "interrupt_response": None,
                    "prefix_padding_ms": None,
                    "silence_duration_ms": None,
                    "threshold": None,
                    "type": None,
                },
            },
        ),
        "voice": None,
    },
}
GA_AUDIO_FORMATS = frozenset({"audio/pcm", "audio/pcmu", "audio/pcma"})
GA_PCM_RATES = frozenset({24000})
BETA_AUDIO_FORMATS = frozenset({"pcm16", "g711_ulaw", "g711_alaw"})


def check_fields(value: Any, shape: FieldShape, where: str) -> None:
    """Refuse, at any depth, a field the API does not declare (``unknown_parameter``) or an unknown ``type``."""
    if shape is None:
        return
    if isinstance(value, list):
        for index, element in enumerate(value):
            check_fields(element, shape, f"{where}[{index}]")
        return
    if not isinstance(value, dict):
        return
    fields: dict[str, FieldShape]
    if isinstance(shape, OneOf):
        kind = value.get("type")
        if kind is None:
            if shape.type_required:
                raise Problem(
                    "missing_required_parameter", f"Missing required parameter: '{where}.type'.", f"{where}.type"
                )
            fields = {key: sub for branch in shape.by_type.values() for key, sub in branch.items()}
        elif isinstance(kind, str) and kind in shape.by_type:
            fields = shape.by_type[kind]
        else:
            raise Problem(
                "invalid_value",
                f"Invalid value: '{kind}'. Supported values are: {supported(shape.by_type)}.",
                f"{where}.type",
            )
    else:
        fields = shape
    for key, sub_value in value.items():
        if key not in fields:
            raise Problem("unknown_parameter", f"Unknown parameter: '{where}.{key}'.", f"{where}.{key}")
        check_fields(sub_value, fields[key], f"{where}.{key}")


def check_ga_format(fmt: Any, where: str) -> None:
    """GA formats are objects: ``audio/pcmu``, ``audio/pcma``, ``audio/pcm`` at 24 kHz (types: ``check_fields``)."""
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise Problem(
            "invalid_type", f"Invalid type for '{where}': expected an object, but got a {type(fmt).__name__}.", where
        )
    if (
        fmt.get("type", "audio/pcm") == "audio/pcm"
        and fmt.get("rate") is not None
        and fmt.get("rate") not in GA_PCM_RATES
    ):
        raise Problem(
            "invalid_value",
            f"Invalid value: '{fmt.get('rate')}'. Supported values are: {supported(GA_PCM_RATES)}.",
            f"{where}.rate",
        )


def codec_of(fmt: Any) -> Literal["pcmu", "pcma", "pcm"]:
    """The encoding a GA format object or a beta format string stands for (PCM16 24 kHz unless G.711)."""
    name = fmt.get("type") if isinstance(fmt, dict) else fmt
    if name in ("audio/pcmu", "g711_ulaw"):
        return "pcmu"
    return "pcma" if name in ("audio/pcma", "g711_alaw") else "pcm"


def check_beta_format(fmt: Any, where: str) -> None:
    """Beta formats are the strings ``pcm16``, ``g711_ulaw`` and ``g711_alaw``."""
    if fmt is not None and fmt not in BETA_AUDIO_FORMATS:
        raise Problem(
            "invalid_value", f"Invalid value: '{fmt}'. Supported values are: {supported(BETA_AUDIO_FORMATS)}.", where
        )
