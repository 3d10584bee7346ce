"""The package's shape, checked from its own source: wings stand on lower wings only, no import
circle, one face per wing for the others, and the sandbox outside the production code.

The wings, lowest first (ARCHITECTURE.md draws them): a module may import its own wing and
any wing below it; `pipeline.api` and `pipeline.cli` (the composition roots) may also start
the sandbox, which itself stands on `core` alone.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).parent
RANKS = {
    "core": 0,
    "journal": 1,
    "provider": 1,
    "checks": 2,
    "outputs": 3,
    "intake": 4,
    "observe": 5,
    "drive": 6,
    "runs": 7,
    "cli": 8,
    "api": 9,
    "__init__": 10,
    "__main__": 10,
}
ROOTS = ("cli", "api")  # who may start the sandbox


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        found[".".join(["pipeline", *parts])] = path
    return found


def _imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every module of the package this one imports, at any depth of its code."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, name, known) for name, path in known.items()}


def test_no_wing_imports_one_above_it() -> None:
    wrong = []
    for module, targets in _graph().items():
        wing = _wing(module)
        if wing == "sandbox":
            wrong += [f"{module} -> {t}" for t in targets if _wing(t) not in ("sandbox", "core")]
            continue
        for target in targets:
            other = _wing(target)
            if other == "sandbox":
                if wing not in ROOTS and module != "pipeline.sandbox":
                    wrong.append(f"{module} -> {target} (production code starts no sandbox)")
            elif other != wing and RANKS[other] >= RANKS[wing] and other != "__init__":
                wrong.append(f"{module} ({wing}) -> {target} ({other})")
    assert wrong == []


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state[target] == 1:
                circles.append([*path[path.index(target) :], target])
            elif state[target] == 0:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])
    assert circles == []


def test_other_wings_import_a_wing_by_its_face() -> None:
    """`from pipeline.journal import Journal`, never `pipeline.journal.store` from outside."""
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            inner = target.count(".") >= 2 and _wing(target) != _wing(module)
            if inner and _wing(module) not in ("sandbox",) and _wing(target) != "sandbox":
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def _classes() -> dict[str, list[tuple[str, int, list[str]]]]:
    """Each class of the package by name: where it is, its lines, and the names of its bases."""
    found: dict[str, list[tuple[str, int, list[str]]]] = defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                bases = [ast.unparse(b).split(".")[-1].split("[")[0] for b in node.bases]
                lines = node.end_lineno - node.lineno + 1
                found[node.name].append((str(path.relative_to(PACKAGE)), lines, bases))
    return found


def _assembled_lines(name: str, classes: dict[str, list[tuple[str, int, list[str]]]]) -> int:
    """A class's lines with those of every class of the package it is assembled from (its
    bases and theirs, each once; a name declared twice counts its longest)."""
    seen: set[str] = set()
    todo = [name]
    total = 0
    while todo:
        current = todo.pop()
        if current in seen or current not in classes:
            continue
        seen.add(current)
        total += max(lines for _, lines, _ in classes[current])
        todo.extend(b for _, _, bases in classes[current] for b in bases)
    return total


def test_no_class_over_300_lines() -> None:
    """Counting the mixins it is assembled from: one object in six rooms is one big object."""
    classes = _classes()
    big = [
        f"{where}:{name} {_assembled_lines(name, classes)}"
        for name, places in classes.items()
        for where, _, _ in places
        if _assembled_lines(name, classes) > 300
    ]
    assert big == []


def test_the_size_check_counts_mixins() -> None:
    """Two mixins of 200 lines make a class of 400: the check above would see it."""
    classes = {
        "A": [("a.py", 200, [])],
        "B": [("b.py", 200, ["A"])],
        "C": [("c.py", 5, ["B", "A", "Protocol"])],
    }
    assert _assembled_lines("C", classes) == 405


def test_intake_does_not_stand_on_outputs() -> None:
    """The first wing reads the catalog; what a run leaves behind (the last) is not under it."""
    wrong = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if _wing(module) == "intake"
        for target in targets
        if _wing(target) == "outputs"
    ]
    assert wrong == []


def test_run_folder_file_names_are_typed_once() -> None:
    """Each run-folder file name is text in `core/files.py` alone; everyone else names it by
    its constant."""
    from pipeline.core import files

    # the failures manifest by its whole names (its stem alone is a common word)
    names = {getattr(files, n) for n in files.__all__ if n != "FAILURES"}
    names |= {f"{files.FAILURES}.{kind}" for kind in ("csv", "tsv", "parquet")}
    typed = []
    for module, path in _modules().items():
        if module == "pipeline.core.files":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                typed.append(f"{module}:{node.lineno} {node.value!r}")
    assert typed == []
