"""The package's shape stays as docs/architecture.md draws it: no import cycle among the
``flashar_adapt`` modules (imports inside functions included), and no module, test,
benchmark or script imports another module's ``_private`` name (a module that needs one
grows a public name instead)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each package's files live (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {
    "flashar_adapt": ROOT / "flashar_adapt",
    "flashar_adapt.integrations": ROOT / "integrations",
    "flashar_adapt.fmnist": ROOT / "fmnist",
}
# Code outside the package that must use public names too.
OTHERS = {"tests": ROOT / "tests", "benchmarks": ROOT / "benchmarks", "scripts": ROOT / "scripts"}


def _modules(roots: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for prefix, folder in roots.items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules(PACKAGES)
EVERY = {**MODULES, **_modules(OTHERS)}


def _imports(name: str, path: Path):
    """(line, module imported from, names imported) for every import statement, relative ones
    resolved; names is None for ``import x.y``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for _, target, names in _imports(name, path):
            for t in (
                [target]
                if names is None
                else [f"{target}.{n}" if f"{target}.{n}" in MODULES else target for n in names]
            ):
                if t in MODULES and t != name:
                    edges.setdefault(name, set()).add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges).union(*edges.values())):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert len(MODULES) > 30
    edges = _edges()
    assert "flashar_adapt.training.loss" in edges["flashar_adapt.training.loop"]  # the walk sees relative imports
    assert _cycles(edges) == []


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(target: str) -> bool:
    return target.split(".")[0] in ("flashar_adapt", "tests", "benchmarks", "scripts") or target in EVERY


def _private_uses(name: str, path: Path) -> list[tuple]:
    """``from ours import _x`` and ``ours_module._x`` where ``ours_module`` is another module
    of ours bound by an import."""
    found, aliases = [], {}
    for line, target, names in _imports(name, path):
        if names is None:
            if _ours(target):
                aliases[target.split(".")[0]] = target.split(".")[0]
            continue
        for n in names:
            if f"{target}.{n}" in EVERY:
                aliases[n] = f"{target}.{n}"
            elif _private(n) and _ours(target) and target != name:
                found.append((name, target, n, line))
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != name
        ):
            found.append((name, aliases[node.value.id], node.attr, node.lineno))
    return found


def test_no_private_name_crosses_a_module():
    found = [f for name, path in EVERY.items() for f in _private_uses(name, path)]
    assert found == [], "import a public name (or give the owning module one): " + "; ".join(
        f"{m}:{line} uses {t}.{n}" for m, t, n, line in found
    )


def test_the_private_check_can_fail(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("from flashar_adapt.training import loop\nfrom flashar_adapt.recipe import _x\nloop._y()\n")
    assert [f[1:3] for f in _private_uses("tests.m", p)] == [
        ("flashar_adapt.recipe", "_x"),
        ("flashar_adapt.training.loop", "_y"),
    ]
