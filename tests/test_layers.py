"""The package's layers, read from the source: Algorithm 1 apart from the operations, no circles.

Every import statement counts, those inside functions too (a lazy import is still a
dependency). The layers (README, "Layout"):

- the method, DeepObliviate's Algorithm 1 top to bottom, and the helpers it stands on;
- the operations: the request lifecycle, the transaction, versioning, the audit, fsck and the
  deletion drain that strings them together;
- the entry points: the CLI and the commands besides deletion (evaluate, verify, compare, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "obliviate"
METHOD = {"partition", "train", "store", "store_writer", "rows", "stoprule", "sweep", "guard",
          "trigger", "gate"}  # fmt: skip
HELPERS = {"config", "data", "models", "device", "predict", "compat", "hashing", "errors",
           "objectstore", "requests", "faults", "validate"}  # fmt: skip
OPERATIONS = {"lifecycle", "transaction", "versioning", "audit", "fsck", "deletion",
              "consolidation"}  # fmt: skip
ENTRY = {"cli", "evaluate", "verify", "compare", "sisa", "report", "export", "plots", "progress",
         "runtime", "distributed", "replay"}  # fmt: skip


def imports(path: Path) -> set[str]:
    """The obliviate modules a source file imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "obliviate":
                out |= {a.name for a in node.names}
            elif node.module.startswith("obliviate."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("obliviate.")}
    return out - {path.stem}


GRAPH = {p.stem: imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def reachable(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in GRAPH.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_every_module_has_one_layer():
    layers = [METHOD, HELPERS, OPERATIONS, ENTRY]
    assert sum(map(len, layers)) == len(set().union(*layers)), "a module is in two layers"
    assert set(GRAPH) == set().union(*layers), "classify the new (or removed) module here"


@pytest.mark.parametrize("module", sorted(METHOD | HELPERS))
def test_the_method_imports_nothing_from_the_operations(module):
    assert not reachable(module) & (OPERATIONS | ENTRY), (module, reachable(module))


def test_no_import_circles():
    circles = sorted(m for m in GRAPH if m in reachable(m))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_rules_would_catch_a_breach(tmp_path):
    """The scan sees a lazy import inside a function (so the tests above can fail)."""
    source = tmp_path / "sweep.py"
    source.write_text("def f():\n    from obliviate.lifecycle import submit\n    return submit\n")
    assert imports(source) == {"lifecycle"}
