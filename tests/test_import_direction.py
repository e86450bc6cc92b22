"""Dependencies point one way, downwards: core -> services -> operations.

The core (every module of ``devft_edge`` outside ``devft_edge.cli`` and ``devft_edge.ops``) never
imports the services (``cloud_aggregator``, ``device_agent``) or the operations layer; the
services never import the operations layer. Imports are read from the source, at any depth
(function bodies included), relative ones resolved, so a module that reaches up fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("cloud_aggregator", "device_agent")
OPERATIONS = ("devft_edge.cli", "devft_edge.ops")
"""The layer above the services: the command line and the tooling that runs or installs them."""
ENTRY_POINTS = ("devft_edge.__main__",)
"""``python -m devft_edge``: runs the CLI, so it sits with the operations layer."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_in(source: str, package: str) -> set[str]:
    """Every module ``source`` imports (``package`` is the one it lives in, for relative imports).

    ``from a import b`` counts as importing ``a`` and ``a.b`` (``b`` may be a sub-module);
    ``importlib.import_module("a.b")`` with a literal name counts as importing ``a.b``.
    """
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if called == "import_module" and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports_in(path.read_text(), package)


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(path): path for package in packages for path in sorted((ROOT / package).rglob("*.py"))}


def _core() -> dict[str, Path]:
    return {
        name: path
        for name, path in _modules("devft_edge").items()
        if not _within(name, OPERATIONS) and name not in ENTRY_POINTS
    }


def _reaching(modules: dict[str, Path], above: tuple[str, ...]) -> dict[str, list[str]]:
    found = {name: sorted(n for n in _imports(path) if _within(n, above)) for name, path in modules.items()}
    return {name: names for name, names in found.items() if names}


def test_the_core_never_imports_the_services_or_the_operations_layer() -> None:
    assert _reaching(_core(), SERVICES + OPERATIONS) == {}


def test_the_services_never_import_the_operations_layer() -> None:
    assert _reaching(_modules(*SERVICES), OPERATIONS) == {}


def test_the_layers_are_where_this_test_looks() -> None:
    """The scan is not vacuous: each layer has modules, and the operations packages exist."""
    core, services = _core(), _modules(*SERVICES)
    assert {"devft_edge.protocol", "devft_edge.pack", "devft_edge.stage"} <= core.keys()
    assert {"cloud_aggregator.service", "device_agent.agent"} <= services.keys()
    for package in OPERATIONS:
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), package
    assert not any(_within(name, OPERATIONS) for name in core)


def test_the_scanner_finds_imports_at_any_depth() -> None:
    """A known upward import is seen: ``demo`` imports the services inside a function."""
    demo = _imports(ROOT / "devft_edge" / "ops" / "demo.py")
    assert {"cloud_aggregator.config", "device_agent.config", "devft_edge.ops.broker"} <= demo
    assert _reaching({"devft_edge.ops.demo": ROOT / "devft_edge" / "ops" / "demo.py"}, SERVICES)
    source = (
        "import importlib\n"
        "def f():\n"
        "    from . import ops\n"
        "    from ..cloud_aggregator import service\n"
        "    importlib.import_module('device_agent.agent')\n"
    )
    found = _imports_in(source, package="devft_edge")
    assert {"devft_edge.ops", "cloud_aggregator.service", "device_agent.agent"} <= found
