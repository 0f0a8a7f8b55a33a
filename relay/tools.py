"""Function tools: a decorator turns an async function into a Realtime function tool.

Handlers live in plain modules (``handlers/``) named in configuration (``RELAY_HANDLERS``);
users add tools without touching ``relay/``. Parameters come from type hints (or an
explicit JSON Schema); arguments are validated before the handler runs, and every
failure becomes a structured error output the model can talk about.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import orjson

from relay.config import AgentSettings

ToolFunc = Callable[..., Awaitable[Any]]
Outcome = Literal["ok", "error", "timeout", "invalid_arguments", "unknown_tool"]
MAX_OUTPUT_CHARS = 16_000


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


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    func: ToolFunc
    timeout_s: float | None = None

    def realtime_tool(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}


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
    elif origin in (list, Sequence, tuple) or annotation is list:
        args = get_args(annotation)
        schema = {"type": "array"}
        if args:
            schema["items"] = _schema_for(args[0], where)
    elif origin in (typing.Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise ToolDefinitionError(f"{where}: only Optional[X] unions are supported")
        schema = _schema_for(members[0], where)
    else:
        raise ToolDefinitionError(f"{where}: unsupported parameter type {annotation!r}")
    if description:
        schema["description"] = description
    return schema


def schema_from_signature(func: ToolFunc) -> dict[str, Any]:
    """JSON Schema of the handler's parameters after the leading ToolContext."""
    hints = get_type_hints(func, include_extras=True)
    params = list(inspect.signature(func).parameters.values())[1:]
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in params:
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
) -> Callable[[ToolFunc], ToolFunc]:
    """Mark an ``async def f(ctx: ToolContext, ...)`` as a tool. Registration happens on load."""

    def mark(func: ToolFunc) -> ToolFunc:
        if not inspect.iscoroutinefunction(func):
            raise ToolDefinitionError(f"{func.__name__}: tools must be async functions")
        spec = ToolSpec(
            name=name or func.__name__,
            description=(description or inspect.getdoc(func) or "").strip(),
            parameters=dict(parameters) if parameters is not None else schema_from_signature(func),
            func=func,
            timeout_s=timeout_s,
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


def validate(value: Any, schema: Mapping[str, Any], path: str = "arguments") -> list[str]:
    """Errors of ``value`` against ``schema`` (type, enum, required, bounds, items, properties)."""
    errors: list[str] = []
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _PY_TYPES:
        ok = isinstance(value, _PY_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{path} must be of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path} must be one of {schema['enum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path} is shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path} is longer than {schema['maxLength']}")
        if "pattern" in schema:
            import re

            if re.search(schema["pattern"], value) is None:
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


def _error_output(kind: str, message: str) -> str:
    return orjson.dumps({"error": {"type": kind, "message": message}}).decode()


class ToolRegistry:
    def __init__(self, default_timeout_s: float = 10.0) -> None:
        self.default_timeout_s = default_timeout_s
        self.tools: dict[str, ToolSpec] = {}

    def add(self, func_or_spec: ToolFunc | ToolSpec) -> ToolSpec:
        spec = func_or_spec if isinstance(func_or_spec, ToolSpec) else getattr(func_or_spec, "__relay_tool__", None)
        if not isinstance(spec, ToolSpec):
            raise ToolDefinitionError(f"{func_or_spec!r} is not decorated with @tool")
        if spec.name in self.tools and self.tools[spec.name].func is not spec.func:
            raise ToolDefinitionError(f"two tools are named {spec.name!r}")
        self.tools[spec.name] = spec
        return spec

    def load_modules(self, modules: Iterable[str]) -> list[str]:
        """Import handler modules and register every @tool function found in them."""
        loaded: list[str] = []
        for module_name in modules:
            module = importlib.import_module(module_name)
            for value in vars(module).values():
                if isinstance(getattr(value, "__relay_tool__", None), ToolSpec):
                    loaded.append(self.add(value).name)
        return loaded

    def specs(self, allowed: Iterable[str] | None = None) -> list[dict[str, Any]]:
        names = list(self.tools) if allowed is None else [n for n in allowed if n in self.tools]
        return [self.tools[n].realtime_tool() for n in names]

    async def run(
        self, name: str, arguments: str, ctx: ToolContext, allowed: Iterable[str] | None = None
    ) -> ToolResult:
        started = time.monotonic()
        spec = self.tools.get(name)
        if spec is None or (allowed is not None and name not in set(allowed)):
            return ToolResult(_error_output("unknown_tool", f"no tool named {name!r}"), "unknown_tool", 0.0)
        try:
            args = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError:
            return ToolResult(
                _error_output("invalid_arguments", "arguments are not valid JSON"), "invalid_arguments", 0.0
            )
        errors = validate(args, spec.parameters)
        if errors:
            return ToolResult(_error_output("invalid_arguments", "; ".join(errors[:10])), "invalid_arguments", 0.0)
        timeout = spec.timeout_s or self.default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                value = await spec.func(ctx, **args)
        except TimeoutError:
            ctx.log.warning("tool %s timed out after %.1f s", name, timeout)
            return ToolResult(
                _error_output("timeout", f"the {name} tool did not answer within {timeout:g} seconds"),
                "timeout",
                time.monotonic() - started,
            )
        except ToolFailure as exc:
            return ToolResult(_error_output("tool_error", str(exc)), "error", time.monotonic() - started)
        except Exception as exc:
            ctx.log.exception("tool %s raised", name)
            return ToolResult(
                _error_output("tool_error", f"the {name} tool failed ({type(exc).__name__})"),
                "error",
                time.monotonic() - started,
            )
        output = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
        if len(output) > MAX_OUTPUT_CHARS:
            output = output[:MAX_OUTPUT_CHARS]
        return ToolResult(output, "ok", time.monotonic() - started)
