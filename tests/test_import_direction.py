"""Data and dependencies flow one way: the core (``devft_edge``) never imports the services
(``cloud_aggregator``, ``device_agent``); only the operations layer above them does. The
operations modules still live in the ``devft_edge`` package (issue 15 item 7 moves them out); they
are named here, so a new core module that reaches up fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "devft_edge"
SERVICES = ("cloud_aggregator", "device_agent")
OPERATIONS = {"cli", "demo", "bundle", "flash", "__main__"}
"""Modules above the services: the CLI and the tooling that runs or installs the services."""


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_services() -> None:
    upward = {
        path.stem: sorted(n for n in _imports(path) if n.split(".")[0] in SERVICES)
        for path in sorted(CORE.glob("*.py"))
        if path.stem not in OPERATIONS
    }
    assert {module: names for module, names in upward.items() if names} == {}


def test_the_operations_layer_is_where_the_services_are_imported() -> None:
    """The exemption list stays honest: each module on it is a real module of the package."""
    assert OPERATIONS <= {path.stem for path in CORE.glob("*.py")}
