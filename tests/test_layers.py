"""The layering rules, checked over the import graph of every ``layerwise`` import: module
level, inside functions and under ``TYPE_CHECKING`` alike."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "layerwise"
MAX_LINES = 400


def imports_of(path: Path) -> set[str]:
    """Every ``layerwise`` module that ``path`` imports, wherever the import statement sits."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "layerwise":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from layerwise import rundir
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("layerwise."))
    return out - {path.stem}


GRAPH = {p.stem: imports_of(p) for p in SRC.glob("*.py")}

# module -> what it must not import, and why
RULES: dict[str, tuple[set[str], str]] = {
    "config": ({m for m in GRAPH if m != "errors"}, "the schema knows types and ranges, no registry or module above it"),
    "resolve": ({"trainer", "loop", "engine", "step", "prefix", "features", "evidence"},
                "deciding settings knows nothing of the loop"),
    "evidence": ({"trainer", "loop", "engine", "step", "features"}, "measuring on the data knows nothing of the loop"),
    "models": ({"groups", "strategies", "plan"}, "building a model knows nothing of its grouping"),
    "lrfind": ({"report"}, "a measurement does not draw"),
    "strategies": ({"config", "plan", "resolve", "trainer", "engine"}, "strategies are pure functions of group names"),
    "plan": ({"trainer", "loop", "engine", "resolve"}, "the plan is data the loop reads"),
    "trainer": ({"engine", "resolve", "evidence", "setup", "loop"}, "the loop reads a resolved plan"),
}


@pytest.mark.parametrize("module", sorted(RULES))
def test_layering_rule(module):
    forbidden, why = RULES[module]
    bad = sorted(GRAPH[module] & forbidden)
    assert not bad, f"{module} imports {', '.join(bad)}: {why}"


def cycle() -> list[str] | None:
    """One import circle of the graph, if there is any."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d] if d in path else [m, d]
            if d in GRAPH and d not in state:
                found = visit(d, path + [d])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_import_circle():
    assert cycle() is None, " -> ".join(cycle() or [])


def test_the_cycle_finder_finds_one(monkeypatch):
    monkeypatch.setitem(GRAPH, "config", GRAPH["config"] | {"engine"})  # engine imports config
    assert cycle() is not None


@pytest.mark.parametrize("path", sorted(SRC.glob("*.py")), ids=lambda p: p.name)
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_graph_reads_function_level_and_type_checking_imports():
    assert "report" in GRAPH["engine"]  # imported inside decide() and find_lr()
    assert "config" in GRAPH["plan"]  # under TYPE_CHECKING


def test_nothing_reassigns_a_config_or_plan_once_built():
    """Resolve decides; nothing after it writes ``x.cfg = ...`` or ``x.plan = ...``."""
    found = []
    for path in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            found += [f"{path.name}:{node.lineno}" for t in targets
                      if isinstance(t, ast.Attribute) and t.attr in ("cfg", "plan", "config")]
    assert not found, f"settings reassigned after resolve at {', '.join(found)}"
