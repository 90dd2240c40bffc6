"""The package's layers: no module imports from a layer above its own (issue 13's architecture check).

cli -> serve -> loader/demo -> pipelines -> compile/runtime/lora -> models/ops ->
fileio/errors/version/capture/blas_env/stored/checkpoints/progress.
The root package (``diffc.load``) is the public facade on top: nothing inside diffc imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffc

ROOT = Path(diffc.__file__).parent
LAYERS = (
    ("__init__", "__main__", "cli"),
    ("serve",),
    ("loader", "demo"),
    ("pipelines", "generic"),
    ("compile", "runtime", "lora", "cache", "parallel"),
    ("models", "ops"),
    ("fileio", "errors", "version", "capture", "blas_env", "stored", "checkpoints", "progress"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top(dotted: str) -> str | None:
    """The first package under diffc of an absolute module name; "__init__" for the root itself."""
    parts = dotted.split(".")
    if parts[0] != "diffc":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == "diffc":  # ``from .. import name``: a submodule or the root
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (ROOT.parent / Path(*sub.split("."))).is_dir()
                    found.append((node.lineno, sub if is_module else target))
            else:
                found.append((node.lineno, target))
    return found


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert (packages | modules) - {"__pycache__"} <= set(RANK), sorted((packages | modules) - set(RANK))


def test_no_module_imports_from_a_layer_above():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        own = _top(_module_name(path)) or "__init__"
        for line, target in _imports(path):
            top = _top(target)
            if top is None or top == own:
                continue
            if RANK[top] < RANK[own]:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({own} -> {top})")
    assert upward == [], "\n".join(upward)


def test_only_the_executor_assigns_the_dit_slots():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if 'components["transformer"] =' in line or "components['transformer'] =" in line \
                    or 'components["transformer_2"] =' in line:
                offenders.append(f"{path.relative_to(ROOT.parent)}:{n}")
    assert offenders == []
