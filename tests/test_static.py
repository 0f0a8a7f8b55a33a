"""The code stays lint-clean and type-checked (mypy --strict on relay/ and handlers/), free of import
cycles, and uses uvicorn's and websockets' internals only where their pinned versions are documented."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import relay.uvicorn_internals
import relay.websockets_internals

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _relay_imports(path: Path) -> set[str]:
    """The relay modules a module imports, at any level (``TYPE_CHECKING`` blocks included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "relay" or name.startswith("relay.")}


def test_relay_has_no_import_cycles() -> None:
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "relay").rglob("*.py")
    }
    graph = {name: {m for m in _relay_imports(path) if m in modules and m != name} for name, path in modules.items()}
    # a module importing its own package's __init__ is how packages re-export; not a cycle of logic
    for name in graph:
        graph[name] -= {p for p in graph[name] if name.startswith(p + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


# ---- uvicorn's and websockets' internals, and the versions they are pinned to ----------------------

INTERNALS = {"uvicorn": relay.uvicorn_internals, "websockets": relay.websockets_internals}
INTERNALS_PATHS = (ROOT / "relay" / "uvicorn_internals", ROOT / "relay" / "websockets_internals.py")
PUBLIC_WEBSOCKETS_MODULES = {
    "websockets",
    "websockets.asyncio.client",
    "websockets.asyncio.server",
    "websockets.datastructures",
    "websockets.exceptions",
    "websockets.http11",
}
# websockets documents State (``Connection.state``'s type) in websockets.protocol with the Sans-I/O API.
PUBLIC_WEBSOCKETS_NAMES = {("websockets.protocol", "State")}
# Undocumented methods and attributes of uvicorn's Server/Config and websockets' Connection.
INTERNAL_ATTRIBUTES = {
    "process_event",
    "send_data",
    "capture_signals",
    "handle_exit",
    "should_exit",
    "force_exit",
    "bind_socket",
    "paused",
}


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


def _pinned(name: str) -> str:
    """The version range of `name` exactly as pyproject.toml spells it, e.g. ``>=0.53,<0.55``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (text,) = [t for t in project["dependencies"] if Requirement(t).name == name]
    return re.sub(r"^[A-Za-z0-9_.-]+(\[[^]]*\])?", "", text).strip()


def test_uvicorn_and_websockets_are_bounded_and_installed_within_the_bounds() -> None:
    for name in INTERNALS:
        (requirement,) = [r for r in _project_requirements() if r.name == name]
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{name} needs an upper bound"
        installed = importlib.metadata.version(name)
        assert requirement.specifier.contains(installed), f"{name} {installed} is outside {requirement.specifier}"


def test_internals_modules_document_the_pinned_range() -> None:
    """Moving a bound in pyproject.toml means re-reading (and updating) what the module relies on."""
    for name, module in INTERNALS.items():
        assert f"``{_pinned(name)}``" in (module.__doc__ or ""), f"{module.__name__} does not name {_pinned(name)}"


def test_lock_pins_every_requirement_within_its_range() -> None:
    lock = ROOT / "requirements.lock"
    assert lock.read_text().startswith("# This file was autogenerated by uv via the following command:\n")
    pins = dict(
        (canonicalize_name(name), version)
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", lock.read_text(), re.MULTILINE)
    )
    for requirement in _project_requirements():
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(version), f"requirements.lock has {requirement.name}=={version}"
        for extra in requirement.extras:
            assert extra in {"standard", "hiredis"}, f"extra {extra} of {requirement.name}: add its packages here"
    assert {"uvloop", "httptools", "watchfiles", "hiredis"} <= pins.keys()


def test_every_install_uses_the_lock_and_the_readme_says_how_to_regenerate_it() -> None:
    command = (ROOT / "requirements.lock").read_text().splitlines()[1].removeprefix("#").strip()
    readme = (ROOT / "README.md").read_text()
    assert f"`{command}`" in readme
    setup = re.findall(r"^```sh\n(.*?)\n```$", readme, re.MULTILINE | re.DOTALL)
    assert setup[:2] == [  # "Try it" and "Run the tests"
        "pip install -c requirements.lock -e . && python -m relay demo",
        "pip install -r requirements.lock && pip install --no-deps -e . && python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pip install -q -r requirements.lock && python -m pip install -q --no-deps -e . && " in ci
    assert "RUN pip install --no-cache-dir -c requirements.lock . " in (ROOT / "infra" / "Dockerfile").read_text()


def _internal_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        modules: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.Import):
            modules = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            modules = [(node.module, [alias.name for alias in node.names])]
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRIBUTES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "protocol"
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .protocol.{node.attr}")
        for module, names in modules:
            if module.startswith("uvicorn."):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}")
            elif module.split(".")[0] == "websockets" and module not in PUBLIC_WEBSOCKETS_MODULES:
                if not names or any((module, name) not in PUBLIC_WEBSOCKETS_NAMES for name in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}")
    return found


def test_uvicorn_and_websockets_internals_are_used_only_in_their_modules() -> None:
    outside = [
        path
        for path in sorted((ROOT / "relay").rglob("*.py"))
        if not any(path == place or place in path.parents for place in INTERNALS_PATHS)
    ]
    assert {ROOT / "relay" / "transport" / "output.py", ROOT / "relay" / "server.py"} <= set(outside)
    assert [use for path in outside for use in _internal_uses(path)] == []


def test_the_internals_check_sees_what_it_forbids() -> None:
    module = ROOT / "relay" / "websockets_internals.py"
    uses = _internal_uses(module)
    assert sorted(use.split(": ", 1)[1] for use in uses) == [
        ".paused",
        ".paused",
        ".process_event",
        ".protocol.send_text",
        ".send_data",
        "websockets.frames",
        "websockets.protocol",
    ]


def test_the_readme_layout_table_matches_the_tree() -> None:
    """Every path the table names exists, and every module and package of relay/ is named there."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout") :].split("\n\n")[1]
    named = set(re.findall(r"`([^`]+)`", table))
    paths = {name.rstrip("/") for name in named if name.split("/")[0] in {"relay", "bench", "handlers", "infra"}}
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []
    tree = {
        f"relay/{p.name}"
        for p in (ROOT / "relay").iterdir()
        if p.name not in {"__init__.py", "__pycache__"} and (p.suffix == ".py" or p.is_dir())
    }
    covered = {p for p in tree if p in paths or any(p.startswith(q + "/") for q in paths)}
    assert sorted(tree - covered) == []


def test_the_openai_package_is_loaded_only_for_sip_mode() -> None:
    """It costs every instance about 36 MB and 0.7 s of start-up; only SIP mode's REST client needs it."""
    probe = "import sys, relay.app, relay.server; print('openai' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
