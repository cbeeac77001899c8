"""Package layering and the public API of ``swarm``.

``server/``, ``client/`` and ``health/`` build on ``swarm/``; ``api/`` builds on ``client/`` and ``swarm/``;
``swarm/`` never imports them at module level (the CLI imports a role inside the function that runs
it), and no role imports ``api/``. ``import swarm`` stays light.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

import swarm

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = "swarm"
ROLES = ("server", "client", "health", "api")
ALSO_ALLOWED = {"api": {"client"}}  # the API is built on the client's async core
PACKAGES = tuple(name for name in (SHARED, *ROLES) if (ROOT / name).is_dir())


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import that runs when ``module`` is imported.

    Walks module-level statements and the compound statements that run with them (if/try/with/
    class bodies), but not function bodies and not ``if TYPE_CHECKING:`` blocks.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found.append((node.lineno, target))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.For, ast.AsyncFor, ast.While, ast.ClassDef)):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(ast.parse(source).body)
    return found


def forbidden_for(package: str) -> set[str]:
    """Top-level packages that ``package`` must not import at module level."""
    if package == SHARED:
        return set(ROLES)
    return set(ROLES) - {package} - ALSO_ALLOWED.get(package, set())


def layering_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = module.split(".")[0]
    bad = forbidden_for(own)
    return [f"{module}:{line} imports {target}" for line, target in module_level_imports(source, module, is_package)
            if target.split(".")[0] in bad]


def python_files() -> list[pathlib.Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


# ---------------------------------------------------------------- the checker itself


def test_checker_flags_module_level_imports():
    source = textwrap.dedent("""
        from __future__ import annotations
        import os
        import server.server
        from client import model
        try:
            from health.app import x
        except ImportError:
            import client.loop
        class K:
            from server import handler
    """)
    assert layering_violations(source, "swarm.thing") == [
        "swarm.thing:4 imports server.server",
        "swarm.thing:5 imports client",
        "swarm.thing:7 imports health.app",
        "swarm.thing:9 imports client.loop",
        "swarm.thing:11 imports server",
    ]


def test_checker_allows_lazy_and_type_checking_imports():
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        import typing
        if TYPE_CHECKING:
            from client.model import Model
        if typing.TYPE_CHECKING:
            import server
        def run():
            from server.server import serve
        async def arun():
            import client
        from swarm.errors import SwarmError
        import torch
    """)
    assert layering_violations(source, "swarm.cli") == []


def test_checker_role_rules_and_relative_imports():
    assert layering_violations("from swarm.wire import encode\nfrom server.compute import X\n", "server.handler") == []
    assert layering_violations("from client import loop\n", "server.handler") == ["server.handler:1 imports client"]
    assert layering_violations("import server.kv_cache\n", "client.model") == ["client.model:1 imports server.kv_cache"]
    assert layering_violations("from server import x\n", "health.app") == ["health.app:1 imports server"]
    assert layering_violations("from client.model import M\nfrom swarm.dht import Peer\n", "api.catalog") == []
    assert layering_violations("from server import x\n", "api.app") == ["api.app:1 imports server"]
    assert layering_violations("import api.app\n", "client.model") == ["client.model:1 imports api.app"]
    assert layering_violations("from api import schemas\n", "swarm.cli") == ["swarm.cli:1 imports api"]
    # relative imports resolve inside the importing package
    assert module_level_imports("from . import transport\nfrom .loop import run\n", "client.model") == [
        (1, "client"), (2, "client.loop")]
    assert module_level_imports("from .errors import E\n", "swarm", is_package=True) == [(1, "swarm.errors")]
    assert module_level_imports("from .. import x\n", "swarm.sub.mod") == [(1, "swarm")]


# ---------------------------------------------------------------- the real tree


def test_every_package_has_files():
    files = python_files()
    for package in (SHARED, "server", "client"):
        assert any(p.relative_to(ROOT).parts[0] == package for p in files), package


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    source = path.read_text()
    violations = layering_violations(source, module_name(path), is_package=path.name == "__init__.py")
    assert violations == [], "module-level imports against the layering (import lazily inside a function)"


# ---------------------------------------------------------------- public API

PUBLIC_API = [
    "AutoDistributedModelForCausalLM",
    "ClientConfig",
    "ModelRecord",
    "ServerConfig",
    "ServerRecord",
    "ServerState",
    "SwarmError",
    "__version__",
]


def test_public_api_is_pinned():
    assert swarm.__all__ == PUBLIC_API
    assert swarm.__all__ == sorted(swarm.__all__)


@pytest.mark.parametrize("name", PUBLIC_API)
def test_public_names_resolve(name):
    value = getattr(swarm, name)
    assert value is not None
    assert name in dir(swarm)


def test_public_names_are_the_real_objects():
    from swarm.config import ClientConfig, ServerConfig
    from swarm.errors import SwarmError
    from swarm.records import ModelRecord, ServerRecord, ServerState

    assert swarm.ClientConfig is ClientConfig and swarm.ServerConfig is ServerConfig
    assert swarm.SwarmError is SwarmError
    assert swarm.ModelRecord is ModelRecord and swarm.ServerRecord is ServerRecord and swarm.ServerState is ServerState
    assert isinstance(swarm.__version__, str)


def test_unknown_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        swarm.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------- import cost

HEAVY = ("torch", "transformers", "hivemind", "client", "server")


def imported_after(code: str) -> list[str]:
    probe = code + textwrap.dedent(f"""
        import sys
        heavy = {HEAVY!r}
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
    """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return eval(result.stdout.strip())  # a printed list of strings


def test_import_swarm_is_light():
    assert imported_after("import swarm\nassert swarm.__version__") == []


def test_probe_detects_heavy_imports():
    assert "client" in imported_after("import client")


def test_lazy_config_access_is_light():
    assert imported_after("import swarm\nswarm.ServerConfig; swarm.ClientConfig; swarm.SwarmError") == []
