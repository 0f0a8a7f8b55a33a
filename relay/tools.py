"""Function tools: a decorator turns an async function into a Realtime function tool.

Handlers live in plain modules (``handlers/``) named in configuration (``RELAY_HANDLERS``);
users add tools without touching ``relay/``. Parameters come from type hints (or an
explicit JSON Schema); arguments are validated before the handler runs, and every
failure becomes a structured error output the model can talk about::

    {"error": {"type": "invalid_arguments" | "tool_error" | "timeout" | "unknown_tool", "message": "…"}}

The guide to writing a tool is the docstring of ``handlers/orders.py``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import re
import time
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import orjson

from relay.agent_settings import AgentSettings
from relay.env import ConfigError

ToolFunc = Callable[..., Awaitable[Any]]
SchemaAdapter = Callable[[dict[str, Any], AgentSettings], dict[str, Any]]
Outcome = Literal["ok", "error", "timeout", "invalid_arguments", "unknown_tool"]
MAX_OUTPUT_CHARS = 16_000
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger("relay.tools")


class ToolDefinitionError(TypeError):
    """A handler's signature cannot be turned into a tool schema."""


class ToolFailure(Exception):
    """Raise from a handler to return a clean, model-readable error (no stack trace)."""


@dataclass
class ToolContext:
    """What a handler may use. Ending or transferring the call goes through these callables."""

    call_sid: str
    caller: str
    called: str
    profile: AgentSettings
    store: Any
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]
    end_call: Callable[[str], Awaitable[None]]
    transfer_call: Callable[[str, str | None], Awaitable[None]]
    summary: Callable[[], str | None] = field(default=lambda: None)


MAX_WHISPER_CHARS = 300
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def _folded(sentence: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", sentence.lower()).strip()


def whisper_text(text: str, *, memory: str | None = None, limit: int = MAX_WHISPER_CHARS) -> str:
    """What a human colleague hears before a transfer: whole sentences, at most ``limit`` characters.

    Sentences that repeat the caller's memory (notes kept from earlier calls) are left out: the
    colleague hears about this call only. A first sentence longer than the limit is cut at a word.
    """
    remembered = {_folded(s) for s in _sentences(memory or "")}
    kept: list[str] = []
    length = 0
    for sentence in _sentences(text):
        if _folded(sentence) in remembered:
            continue
        extra = len(sentence) + (1 if kept else 0)
        if length + extra > limit:
            if not kept:
                cut = sentence[: limit - 1].rsplit(" ", 1)[0].rstrip(",;:- ")
                kept.append(cut + "…")
            break
        kept.append(sentence)
        length += extra
    return " ".join(kept)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    func: ToolFunc
    timeout_s: float | None = None
    adapt: SchemaAdapter | None = None
    """Optional: tailor the tool the model sees to the call's profile (e.g. list its destinations)."""

    def realtime_tool(self, profile: AgentSettings | None = None) -> dict[str, Any]:
        tool = {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}
        if self.adapt is not None and profile is not None:
            tool = self.adapt(orjson.loads(orjson.dumps(tool)), profile)
        return tool


@dataclass(frozen=True)
class ToolResult:
    output: str
    outcome: Outcome
    duration_s: float


_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}


def _schema_for(annotation: Any, where: str) -> dict[str, Any]:
    description: str | None = None
    if get_origin(annotation) is typing.Annotated:
        base, *extras = get_args(annotation)
        description = next((e for e in extras if isinstance(e, str)), None)
        annotation = base
    origin = get_origin(annotation)
    schema: dict[str, Any]
    if annotation in _JSON_TYPES:
        schema = {"type": _JSON_TYPES[annotation]}
    elif origin is Literal:
        values = list(get_args(annotation))
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or next(iter(kinds)) not in _JSON_TYPES:
            raise ToolDefinitionError(f"{where}: Literal values must share one JSON type")
        schema = {"type": _JSON_TYPES[next(iter(kinds))], "enum": values}
    elif annotation is list or origin in (list, Sequence):
        args = get_args(annotation)
        schema = {"type": "array"}
        if args:
            schema["items"] = _schema_for(args[0], where)
    elif origin is tuple:
        args = get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise ToolDefinitionError(f"{where}: only tuple[X, ...] is supported (use list[X])")
        schema = {"type": "array", "items": _schema_for(args[0], where)}
    elif origin is dict:
        schema = {"type": "object"}
    elif origin in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise ToolDefinitionError(f"{where}: only Optional[X] unions are supported")
        schema = _schema_for(members[0], where)
        schema["type"] = [schema["type"], "null"]  # the model may send null for "not given"
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    else:
        raise ToolDefinitionError(f"{where}: unsupported parameter type {annotation!r}")
    if description:
        schema["description"] = description
    return schema


def schema_from_signature(func: ToolFunc) -> dict[str, Any]:
    """JSON Schema of the handler's parameters after the leading ToolContext."""
    try:
        hints = get_type_hints(func, include_extras=True)
    except NameError as exc:
        raise ToolDefinitionError(f"{func.__name__}: cannot resolve a type hint ({exc})") from None
    all_params = list(inspect.signature(func).parameters.values())
    if not all_params or all_params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ToolDefinitionError(f"{func.__name__}: the first parameter must be the ToolContext")
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in all_params[1:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ToolDefinitionError(f"{func.__name__}: *args/**kwargs are not allowed in tools")
        if p.name not in hints:
            raise ToolDefinitionError(f"{func.__name__}.{p.name}: a type hint is required")
        properties[p.name] = _schema_for(hints[p.name], f"{func.__name__}.{p.name}")
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def tool(
    name: str | None = None,
    *,
    description: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    adapt: SchemaAdapter | None = None,
) -> Callable[[ToolFunc], ToolFunc]:
    """Mark an ``async def f(ctx: ToolContext, ...)`` as a tool. Registration happens on load.

    ``name`` defaults to the function's name, ``description`` to its docstring, ``parameters``
    (an explicit JSON Schema object) to the schema of its type hints; ``timeout_s`` overrides
    ``RELAY_TOOL_TIMEOUT`` for this tool.
    """

    def mark(func: ToolFunc) -> ToolFunc:
        if not inspect.iscoroutinefunction(func):
            raise ToolDefinitionError(f"{getattr(func, '__name__', func)!r}: tools must be async functions")
        tool_name = name or func.__name__
        if not TOOL_NAME.fullmatch(tool_name):
            raise ToolDefinitionError(f"{tool_name!r}: tool names are 1-64 letters, digits, '_' or '-'")
        if parameters is not None:
            schema = dict(parameters)
            if schema.get("type") != "object" or not isinstance(schema.get("properties", {}), Mapping):
                raise ToolDefinitionError(f"{tool_name}: an explicit schema must be a JSON Schema object")
        else:
            schema = schema_from_signature(func)
        if timeout_s is not None and timeout_s <= 0:
            raise ToolDefinitionError(f"{tool_name}: timeout_s must be positive")
        spec = ToolSpec(
            name=tool_name,
            description=(description or inspect.getdoc(func) or "").strip(),
            parameters=schema,
            func=func,
            timeout_s=timeout_s,
            adapt=adapt,
        )
        if not spec.description:
            raise ToolDefinitionError(f"{spec.name}: a description (or docstring) is required")
        func.__relay_tool__ = spec  # type: ignore[attr-defined]
        return func

    return mark


# ---- argument validation (the JSON Schema subset tools use) -------------------------------

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _is_type(value: Any, kind: str) -> bool:
    if kind not in _PY_TYPES:
        return True  # a type this validator does not know: leave it to the handler
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _PY_TYPES[kind])


def validate(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> list[str]:
    """Errors of ``value`` against ``schema`` (type, enum, required, bounds, items, properties)."""
    errors: list[str] = []
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, list) else []
    if kinds and not any(_is_type(value, k) for k in kinds):
        return [f"{path} must be of type {' or '.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path} must be one of {[v for v in schema['enum'] if v is not None]}"]
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path} is shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path} is longer than {schema['maxLength']}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errors.append(f"{path} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path} must be <= {schema['maximum']}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, element in enumerate(value):
            errors.extend(validate(element, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for req in schema.get("required") or ():
            if req not in value:
                errors.append(f"{path}.{req} is required")
        for key, element in value.items():
            if key in props:
                errors.extend(validate(element, props[key], f"{path}.{key}"))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{key} is not a known parameter")
    return errors


def error_output(kind: str, message: str) -> str:
    """The structured error the model receives as the function output."""
    return orjson.dumps({"error": {"type": kind, "message": message}}).decode()


class ToolRegistry:
    def __init__(self, default_timeout_s: float = 10.0) -> None:
        self.default_timeout_s = default_timeout_s
        self.tools: dict[str, ToolSpec] = {}

    def add(self, func_or_spec: ToolFunc | ToolSpec) -> ToolSpec:
        spec = func_or_spec if isinstance(func_or_spec, ToolSpec) else getattr(func_or_spec, "__relay_tool__", None)
        if not isinstance(spec, ToolSpec):
            raise ToolDefinitionError(f"{func_or_spec!r} is not decorated with @tool")
        existing = self.tools.get(spec.name)
        if existing is not None and existing.func is not spec.func:
            raise ToolDefinitionError(
                f"two tools are named {spec.name!r} ({_where(existing.func)} and {_where(spec.func)})"
            )
        self.tools[spec.name] = spec
        return spec

    def load_modules(self, modules: Iterable[str]) -> list[str]:
        """Import handler modules and register every @tool function found in them."""
        loaded: list[str] = []
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # any failure of the module's own code is a configuration error too
                detail = " ".join(str(exc).split())[:300]
                raise ConfigError(
                    f"RELAY_HANDLERS: cannot import {module_name!r}: {type(exc).__name__}: {detail}"
                ) from exc
            found = [v for v in vars(module).values() if isinstance(getattr(v, "__relay_tool__", None), ToolSpec)]
            if not found:
                log.warning("handler module %s defines no @tool functions", module_name)
            for value in found:
                loaded.append(self.add(value).name)
        return loaded

    def specs(self, allowed: Iterable[str] | None = None, profile: AgentSettings | None = None) -> list[dict[str, Any]]:
        """The ``tools`` of a session: every tool, or the allowed ones in that order, fitted to the profile."""
        names = list(self.tools) if allowed is None else [n for n in allowed if n in self.tools]
        return [self.tools[n].realtime_tool(profile) for n in names]

    async def run(
        self, name: str, arguments: str, ctx: ToolContext, allowed: Iterable[str] | None = None
    ) -> ToolResult:
        """Validate, run with the tool's timeout, and always come back with an output for the model."""
        started = time.monotonic()
        spec = self.tools.get(name)
        if spec is None or (allowed is not None and name not in set(allowed)):
            ctx.log.warning("the model called an unknown tool %r", name[:64])
            return ToolResult(error_output("unknown_tool", f"no tool named {name!r}"), "unknown_tool", 0.0)
        try:
            args = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError:
            return ToolResult(
                error_output("invalid_arguments", "arguments are not valid JSON"), "invalid_arguments", 0.0
            )
        try:
            errors = validate(args, spec.parameters) if isinstance(args, dict) else ["arguments must be a JSON object"]
        except Exception as exc:  # e.g. a bad "pattern" in an explicit schema: the tool's fault, not the model's
            ctx.log.error("tool %s: its schema cannot be checked (%s: %s)", name, type(exc).__name__, exc)
            return ToolResult(error_output("tool_error", f"the {name} tool is misconfigured"), "error", 0.0)
        if errors:
            ctx.log.info("tool %s called with invalid arguments: %s", name, "; ".join(errors[:3]))
            return ToolResult(error_output("invalid_arguments", "; ".join(errors[:10])), "invalid_arguments", 0.0)
        timeout = spec.timeout_s or self.default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                value = await spec.func(ctx, **args)
        except TimeoutError:
            ctx.log.warning("tool %s timed out after %.1f s", name, timeout)
            return ToolResult(
                error_output("timeout", f"the {name} tool did not answer within {timeout:g} seconds"),
                "timeout",
                time.monotonic() - started,
            )
        except ToolFailure as exc:
            return ToolResult(error_output("tool_error", str(exc)), "error", time.monotonic() - started)
        except Exception as exc:
            ctx.log.exception("tool %s raised", name)
            return ToolResult(
                error_output("tool_error", f"the {name} tool failed ({type(exc).__name__})"),
                "error",
                time.monotonic() - started,
            )
        try:
            output = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
        except TypeError as exc:
            ctx.log.error("tool %s returned a value that is not JSON: %s", name, exc)
            return ToolResult(
                error_output("tool_error", f"the {name} tool returned an unusable result"),
                "error",
                time.monotonic() - started,
            )
        if len(output) > MAX_OUTPUT_CHARS:
            output = output[:MAX_OUTPUT_CHARS]
        return ToolResult(output, "ok", time.monotonic() - started)


def _where(func: ToolFunc) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
