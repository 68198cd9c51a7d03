"""Imports point down: the layers of docs/architecture.md, read from the source with `ast`.

Every module of `src/vezaprovisioner` belongs to one layer; it may import its own layer and the
layers below, never one above. On top of that: only `api/`, `cli.py` and `iis_entry.py` import
`api/`; an Exchange backend imports neither the configuration nor another backend; `failures.py`
imports nothing of the package. A new module must be given a layer here (and in the note).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vezaprovisioner"

#: Top to bottom, as docs/architecture.md draws them; prefixes name a module or a package.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry points",
        (
            "vezaprovisioner.__main__",
            "vezaprovisioner.api",
            "vezaprovisioner.cli",
            "vezaprovisioner.iis_entry",
            "vezaprovisioner.doctor",
            "vezaprovisioner.standalone",
        ),
    ),
    ("wiring", ("vezaprovisioner.services",)),
    (
        "flow",
        (
            "vezaprovisioner.provisioning",
            "vezaprovisioner.recovery",
            "vezaprovisioner.flow_threads",
            "vezaprovisioner.aliases",
        ),
    ),
    (
        "records and callers",
        (
            "vezaprovisioner.journal",
            "vezaprovisioner.audit",
            "vezaprovisioner.metrics",
            "vezaprovisioner.auth",
            "vezaprovisioner.auth_budget",
        ),
    ),
    ("exchange port and backends", ("vezaprovisioner.exchange",)),
    (
        "base",
        (
            "vezaprovisioner.config",
            "vezaprovisioner.failures",
            "vezaprovisioner.clock",
            "vezaprovisioner.validation",
            "vezaprovisioner.iis",
            "vezaprovisioner.iis_settings",
            "vezaprovisioner.logs",
            "vezaprovisioner",  # the package's __init__ (its version)
        ),
    ),
)
API_IMPORTERS = ("vezaprovisioner.api", "vezaprovisioner.cli", "vezaprovisioner.iis_entry")
BACKENDS = (
    "vezaprovisioner.exchange.simulated",
    "vezaprovisioner.exchange.local",
    "vezaprovisioner.exchange.remote",
)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """Index into LAYERS (0 = top) by the longest matching prefix; None when unplaced."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            placed = module == prefix if prefix == PACKAGE else _within(module, prefix)
            if placed and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file, and whether it is a package's __init__."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imports_of(path: Path) -> set[str]:
    """Every module of the package that `path` imports, anywhere in the file (lazy ones too)."""
    name, is_package = module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
    return {module for module in found if _within(module, PACKAGE)}


def source_imports() -> dict[str, set[str]]:
    return {
        module_name(path)[0]: imports_of(path) for path in sorted((SRC / PACKAGE).rglob("*.py"))
    }


def violations(imports: Mapping[str, set[str]]) -> list[str]:
    """Every import that breaks a rule, as 'importer -> imported: why'."""
    found: list[str] = []
    for importer, targets in sorted(imports.items()):
        level = layer_of(importer)
        if level is None:
            found.append(f"{importer}: not placed in a layer (tests/test_architecture.py)")
            continue
        for target in sorted(targets):
            target_level = layer_of(target)
            if target_level is not None and target_level < level:
                found.append(
                    f"{importer} -> {target}: {LAYERS[level][0]} imports {LAYERS[target_level][0]}"
                )
            if _within(target, "vezaprovisioner.api") and not any(
                _within(importer, allowed) for allowed in API_IMPORTERS
            ):
                found.append(f"{importer} -> {target}: only api/, cli and iis_entry import api/")
            backend = next((b for b in BACKENDS if _within(importer, b)), None)
            if backend is not None:
                if _within(target, "vezaprovisioner.config"):
                    found.append(f"{importer} -> {target}: a backend reads no configuration")
                if any(_within(target, b) for b in BACKENDS if b != backend):
                    found.append(f"{importer} -> {target}: a backend imports no other backend")
            if importer == "vezaprovisioner.failures":
                found.append(f"{importer} -> {target}: failures.py sits below everything")
    return found


def test_every_import_in_src_points_down() -> None:
    imports = source_imports()
    assert len(imports) > 40  # the scan found the package
    assert violations(imports) == []


def test_services_does_not_import_the_http_layer() -> None:
    assert not any(
        _within(m, "vezaprovisioner.api") for m in source_imports()[f"{PACKAGE}.services"]
    )


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("vezaprovisioner.services", "vezaprovisioner.api.problems"),
        ("vezaprovisioner.journal.records", "vezaprovisioner.provisioning"),
        ("vezaprovisioner.exchange.errors", "vezaprovisioner.journal.claims"),
        ("vezaprovisioner.exchange.remote", "vezaprovisioner.config"),
        ("vezaprovisioner.exchange.local.backend", "vezaprovisioner.exchange.simulated.engine"),
        ("vezaprovisioner.doctor", "vezaprovisioner.api.problems"),
        ("vezaprovisioner.failures", "vezaprovisioner.clock"),
        ("vezaprovisioner.something_new", "vezaprovisioner.clock"),
    ],
)
def test_an_import_that_runs_back_up_is_reported(importer: str, imported: str) -> None:
    assert violations({importer: {imported}}) != []


def test_relative_imports_are_resolved_from_the_file() -> None:
    engine = SRC / PACKAGE / "exchange" / "simulated" / "engine.py"
    found = imports_of(engine)
    assert {"vezaprovisioner.clock", "vezaprovisioner.exchange.errors"} <= found
    assert "vezaprovisioner.exchange.simulated.directory" in found
