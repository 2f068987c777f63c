"""The package's layout: stages in one order, imports only downward, no circles, nothing private crossing a module.

The import graph is read from the source with ``ast`` (no module is imported). Every import that can run counts:
top-level and inside functions (lazy). Imports under ``if TYPE_CHECKING:`` never run; they name types for annotations
only (``atlas: Atlas`` in a query that the ``Atlas`` handle calls), so they are left out. docs/architecture.md
explains the stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "neuronmap"

# The pipeline, bottom to top: a module may import from its own stage and the stages before it, never after.
STAGES = ("core", "sources", "decode", "atlas", "mapping", "runtime", "evidence", "intervene", "removal", "compare",
          "viewer", "cli", "testing")
# Modules directly under neuronmap/: the package's lazy re-exports and `python -m neuronmap` sit above every stage.
TOP = {"neuronmap", "neuronmap.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def stage(module: str) -> int:
    """The stage's index; the top-level modules rank above all."""
    if module in TOP:
        return len(STAGES)
    return STAGES.index(module.split(".")[1])


def runnable(tree: ast.AST):
    """Every node of the tree but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runnable(child)])
            continue
        yield node
        yield from runnable(node)


def imports(path: Path) -> list[tuple[str, str, int]]:
    """``(imported module, name or "", line)`` for every neuronmap import in the file that can run, wherever it stands."""
    out = []
    for node in runnable(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write neuronmap.… in full"
            if (node.module or "").split(".")[0] == "neuronmap":
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.append((sub, "", node.lineno) if sub in MODULES else (node.module, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "neuronmap"]
    return out


def graph() -> dict[str, set[str]]:
    return {m: {dep for dep, _, _ in imports(p) if dep != m} for m, p in MODULES.items()}


def test_every_module_belongs_to_a_stage():
    strays = [m for m in MODULES if m not in TOP and m.split(".")[1] not in STAGES]
    assert not strays, f"modules outside every stage (add a stage to STAGES, in order, or move them): {strays}"


def test_no_import_from_a_later_stage():
    bad = [f"{m} (stage {STAGES[stage(m)] if m not in TOP else 'top'}) imports {dep} at line {line}"
           for m, p in MODULES.items() for dep, _, line in imports(p)
           if dep in MODULES and stage(dep) > stage(m)]
    assert not bad, "imports that run up the pipeline:\n" + "\n".join(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert cycles(graph()) == []


def test_imports_under_type_checking_are_left_out_and_lazy_ones_kept(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neuronmap.cli import main\n"
                 "def g():\n    from neuronmap.core import ids\n")
    assert [dep for dep, _, _ in imports(f)] == ["neuronmap.core.ids"]


def test_the_cycle_finder_finds_a_circle():
    # The check above must be able to fail: a two-module circle and a self-contained chain.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_private_crosses_a_module():
    bad = []
    for m, p in MODULES.items():
        for dep, name, line in imports(p):
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{m}:{line} imports {name} from {dep}")
        for node in ast.walk(ast.parse(p.read_text())):
            # module._name, where module is a neuronmap module imported under that name
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id in _module_aliases(p):
                bad.append(f"{m}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules (make them public, named for what they do):\n" + "\n".join(bad)


def _module_aliases(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neuronmap"):
            out |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            out |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("neuronmap")}
    return out


@pytest.mark.parametrize("package", [p for p in STAGES])
def test_each_stage_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((PKG / package / "__init__.py").read_text())) or ""
    assert "May import:" in doc, f"neuronmap/{package}/__init__.py: its docstring must say what it may import"


def test_the_pipeline_does_not_import_test_support():
    users = {m for m, deps in graph().items() if any(d.startswith("neuronmap.testing") for d in deps)
             and not m.startswith("neuronmap.testing")}
    assert not users, f"neuronmap.testing is for tests and bench only, imported by {sorted(users)}"
