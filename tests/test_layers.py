"""The package's layers, read from its imports: rso_ray/training/ is torch-only (no ray, no mlflow), every
module imports only from its own layer or the ones below it, and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rso_ray"
# Lowest first. A module may import from its own layer and any layer before it in this list.
LAYERS: list[tuple[str, ...]] = [
    ("console", "yaml_loader"),
    ("core",),
    ("models",),
    ("data",),
    ("training",),
    ("config",),
    ("export",),
    ("cluster",),
    ("tuning",),
    ("train", "tune", "memory"),
]
RAY_OR_MLFLOW = ("ray", "mlflow")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved), wherever the import is."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # "from . import storage" names a module
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS")


def _internal(imports: set[str]) -> set[str]:
    return {m for m in imports if m in MODULES and m != "rso_ray"}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "rso_ray":
            _layer(module)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("rso_ray.training")])
def test_the_training_layer_is_torch_only(module: str) -> None:
    bad = sorted(m for m in _imports(MODULES[module]) if m.split(".")[0] in RAY_OR_MLFLOW)
    assert not bad, f"{module} imports {bad}: Ray and MLflow belong in rso_ray/cluster/"


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {dep}" for m, deps in graph.items() for dep in deps if _layer(dep) > _layer(m))


def mutual(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    return sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, set())})


GRAPH = {m: _internal(_imports(p)) - {m} for m, p in MODULES.items() if m != "rso_ray"}


def test_nothing_imports_upward() -> None:
    assert not upward(GRAPH), "imports that run up the layers:\n" + "\n".join(upward(GRAPH))


def test_no_two_modules_import_each_other() -> None:
    assert not mutual(GRAPH), f"modules that import each other: {mutual(GRAPH)}"


def test_the_checker_finds_what_it_looks_for() -> None:
    """The checks themselves, on the arrows this layout removed: the driver in training/ importing export,
    and records and sources importing each other."""
    assert "rso_ray.core.methods" in _imports(MODULES["rso_ray.training.engine"])  # relative import resolved
    assert "rso_ray.training.storage" in _imports(MODULES["rso_ray.cluster.runlock"])  # "from ..training import storage"
    old = {"rso_ray.training.launch": {"rso_ray.export"}, "rso_ray.export": {"rso_ray.training.checkpoint"},
           "rso_ray.data.records": {"rso_ray.data.sources"}, "rso_ray.data.sources": {"rso_ray.data.records"}}
    assert upward(old) == ["rso_ray.training.launch -> rso_ray.export"]
    assert mutual(old) == [("rso_ray.data.records", "rso_ray.data.sources")]
