"""The house's shape (STYLE.md rule 20; issue 22): layers only look down, no room does several jobs.

Layers, lowest first: ``strokeseg.core`` < ``models`` < ``strokeseg.datasets`` <
``strokeseg.inference`` < ``strokeseg.training`` < ``strokeseg.evaluation`` < the top
(``strokeseg.ablation``, ``strokeseg.stages``, ``strokeseg.demo``, ``strokeseg.export``, scripts).
A module may import its own layer and the layers below it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("strokeseg.core", "models", "strokeseg.datasets", "strokeseg.inference", "strokeseg.training", "strokeseg.evaluation")
TOP = len(LAYERS)
PACKAGE_FILES = sorted(p for d in ("strokeseg", "models") for p in (ROOT / d).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """Index of ``module``'s layer; TOP for the rest of strokeseg; None outside the project."""
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return TOP if module.split(".")[0] == "strokeseg" else None


def _imports(path: Path, source: str) -> list[str]:
    """Absolute names of the modules that ``source`` (the text of ``path``) imports, relative
    imports resolved against ``path``'s package."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def _upward_imports(path: Path, source: str | None = None) -> list[str]:
    own = _layer(_module_name(path))
    text = path.read_text() if source is None else source
    return [name for name in _imports(path, text) if (layer := _layer(name)) is not None and layer > own]


def test_layers_only_look_down():
    upward = {str(p.relative_to(ROOT)): found for p in PACKAGE_FILES if (found := _upward_imports(p))}
    assert upward == {}


def test_the_layer_check_sees_an_upward_import():
    probe = ROOT / "strokeseg" / "core" / "probe.py"
    source = "from ..training import engine\nimport models\nfrom . import io\nimport numpy\n"
    assert _upward_imports(probe, source) == ["strokeseg.training", "models"]


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE_FILES if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_60_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{n.name}:{n.lineno} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
