"""The docs are tests: every Python block in README.md and docs/*.md runs, and every
``layerwise`` command line shown that works offline (``--weights none``, ``layerwise models``,
or a fit on the embedded digits) runs and exits 0."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

import layerwise
from layerwise.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(where, code)`` of every fenced block in ``lang``."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == lang:
                line = text[: m.start()].count("\n") + 1
                out.append((f"{doc.relative_to(ROOT)}:{line}", m.group(2)))
    return out


def command_lines() -> list[tuple[str, list[str]]]:
    """``layerwise`` commands of the bash blocks (continuation lines joined, comments dropped)
    and of inline code in the prose, except those with placeholders (RUN, NAME..., <run>)."""
    out = []
    for where, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("layerwise "):
                out.append((where, shlex.split(line)[1:]))
    for doc in DOCS:
        for m in re.finditer(r"`layerwise ([^`]+)`", doc.read_text().replace("\n", " ")):
            argv = shlex.split(m.group(1))
            placeholder = any(re.fullmatch(r"[A-Z]+(\.\.\.|/\S*)?|.*[<>|].*|\.\.\.", a) for a in argv)
            if len(argv) > 1 and not placeholder:  # a bare `layerwise plan` names the command
                out.append((f"{doc.relative_to(ROOT)} (inline)", argv))
    return out


def offline(argv: list[str]) -> bool:
    """Runs without a network, a run folder or the user's data: ``models``, and ``plan``/``fit``
    without DATA on random weights or the packaged Lite0 weights. (``compare`` lines are the
    measured benchmark commands; bench/ runs those.)"""
    if argv[0] == "models":
        return True
    if argv[0] not in ("plan", "fit") or "--resume" in argv or (len(argv) > 1 and not argv[1].startswith("-")):
        return False
    weights = argv[argv.index("--weights") + 1] if "--weights" in argv else "default"
    model = argv[argv.index("--model") + 1] if "--model" in argv else "efficientnet_lite0"
    return weights == "none" or (weights == "default" and model == "efficientnet_lite0")


PYTHON = blocks("python")
COMMANDS = [(w, a) for w, a in command_lines() if offline(a)]


def test_the_docs_have_blocks_to_check():
    assert len(PYTHON) >= 2 and len(COMMANDS) >= 3  # the README's and the tutorial mapping's, at least


@pytest.mark.parametrize("where,code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_block_runs(where, code, tmp_path, monkeypatch):
    from layerwise.strategies import STRATEGIES

    monkeypatch.chdir(tmp_path)
    registered = dict(STRATEGIES)  # an example may register a strategy: it must not leak into other tests
    try:
        exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(registered)


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w}: {' '.join(a[:3])}" for w, a in COMMANDS])
def test_command_line_runs(where, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "fit":  # the embedded-data fit as shown, on a test budget (later flags win)
        argv = [*argv, "--epochs", "1", "--img-size", "32", "--quiet"]
    assert main(argv) == 0, (where, argv, capsys.readouterr().err)


def test_the_package_exports_what_the_docs_import():
    names = set()
    for _, code in PYTHON:
        for m in re.finditer(r"^from layerwise import (.+)$", code, re.M):
            names |= {n.strip() for n in m.group(1).split(",")}
    defined = {node.name for f in (ROOT / "src" / "layerwise").glob("*.py")
               for node in ast.parse(f.read_text()).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for doc in DOCS:  # a layerwise function called in prose, e.g. `freeze_all_but_head(model, groups)`
        names |= set(re.findall(r"`([A-Za-z_]+)\(", doc.read_text())) & defined
    missing = sorted(n for n in names if not hasattr(layerwise, n))
    assert not missing, f"the docs use layerwise.{missing} but the package does not export them"
