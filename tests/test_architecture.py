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


# Libraries whose documented way to set something is an attribute: sqlite3's row factory,
# anyio's cancel-scope deadline, uvicorn's config and server flags, starlette's `app.state`,
# Python's own function signature.
_LIBRARY_ATTRIBUTES = {
    "row_factory",
    "deadline",
    "timeout_keep_alive",
    "lifespan",
    "should_exit",
    "sandbox",  # app.state.sandbox
    # a function's signature, as inspect (and typer through it) reads it: the sandbox
    # command's options, made from the sandbox's settings
    "__signature__",
    "__annotations__",
}


def _record_fields(paths: list[Path]) -> set[str]:
    """The fields of the records (dataclasses) these modules declare."""
    fields: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                "dataclass" in ast.unparse(d) for d in node.decorator_list
            ):
                fields.update(
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                )
    return fields


def _set_from_outside(tree: ast.Module) -> list[tuple[int, str, bool]]:
    """Each `x.attr = ...` (or `x.attr += ...`, or setattr(x, ...)) where x is not `self` or
    `cls`: its line, the attribute, and whether it counts up (`+=`)."""
    found: list[tuple[int, str, bool]] = []

    def target(node: ast.expr, line: int, counts: bool) -> None:
        if isinstance(node, ast.Attribute):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not own:
                found.append((line, node.attr, counts))
        elif isinstance(node, ast.Tuple | ast.List):
            for element in node.elts:
                target(element, line, counts)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                target(t, node.lineno, False)
        elif isinstance(node, ast.AugAssign):
            target(node.target, node.lineno, isinstance(node.op, ast.Add | ast.Sub))
        elif isinstance(node, ast.AnnAssign):
            target(node.target, node.lineno, False)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            first = node.args[0] if node.args else None
            if not (isinstance(first, ast.Name) and first.id == "self"):
                found.append((node.lineno, "setattr", False))
    return found


def _outside_setters(source: str, records: set[str], counters: set[str]) -> list[tuple[int, str]]:
    return [
        (line, attr)
        for line, attr, counts in _set_from_outside(ast.parse(source))
        if attr not in records
        and attr not in _LIBRARY_ATTRIBUTES
        and not (counts and attr in counters)
    ]


def test_no_part_is_finished_from_outside() -> None:
    """No attribute of another object is set after it is made. Two kinds of change are not
    finishing a part: counting up one of the run's counters (`core/counters.py`), and a
    record's fields (a dataclass: a sandbox job, a Ray worker's place, an estimate's tally)
    changed in the folder that declares it. Parts take what they need in their constructors
    and change through their methods."""
    modules = _modules()
    counters = _record_fields([PACKAGE / "core" / "counters.py"])
    folders: dict[Path, list[Path]] = defaultdict(list)
    for path in modules.values():
        folders[path.parent].append(path)
    records = {folder: _record_fields(paths) for folder, paths in folders.items()}
    wrong = [
        f"{module}:{line} .{attr}"
        for module, path in modules.items()
        for line, attr in _outside_setters(path.read_text(), records[path.parent], counters)
    ]
    assert wrong == []


def test_the_outside_setter_check_sees_wiring() -> None:
    wired = (
        "def build(stats, part, scope, job):\n"
        "    stats.callbacks = 1\n"
        "    part.hook = 2\n"
        "    scope.deadline = 3\n"
        "    setattr(stats, 'n', 1)\n"
        "    stats.polls += 1\n"
        "    job.ended = True\n"
    )
    found = _outside_setters(wired, records={"ended"}, counters={"polls"})
    assert found == [(2, "callbacks"), (3, "hook"), (5, "setattr")]


# Where the config is taken apart: the composition roots (the CLI, the API, the runs), the key
# side's assembler and engine, the Ray workers' own assembling, the embedded sandbox's start,
# and the config and its plan themselves. Every other part takes the plan or a section.
_ASSEMBLING = (
    "pipeline.api",
    "pipeline.cli",
    "pipeline.runs",
    "pipeline.drive.assemble",
    "pipeline.drive.engine",
    "pipeline.drive.ray.cluster",
    "pipeline.drive.ray.members",
    "pipeline.drive.ray.remote",
    "pipeline.sandbox.embedded",
    "pipeline.core",  # the package face re-exports it
    "pipeline.core.config",
    "pipeline.core.plan",
)


def _names_the_config(tree: ast.Module) -> list[int]:
    """The lines naming RunConfig (imported, annotated, called)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "RunConfig":
            lines.append(node.lineno)
        elif isinstance(node, ast.alias) and node.name == "RunConfig":
            lines.append(getattr(node, "lineno", 0))
        elif isinstance(node, ast.Constant) and str(node.value).startswith("RunConfig"):
            lines.append(node.lineno)  # a string annotation
    return lines


def test_the_config_stops_at_the_assembling_code() -> None:
    """Below the assembling code, parts take the plan (`core/plan.py`) or the section they
    need; the time scale is applied in the plan alone (the sandbox keeps its own clock)."""
    wrong = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        assembling = any(module == a or module.startswith(f"{a}.") for a in _ASSEMBLING)
        if not assembling:
            wrong += [f"{module}:{line} RunConfig" for line in _names_the_config(tree)]
        if _wing(module) != "sandbox":
            wrong += [
                f"{module}:{node.lineno} .scaled()"
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and node.attr == "scaled"
            ]
    assert wrong == []


def test_the_config_check_sees_a_config_below() -> None:
    source = "from pipeline.core import RunConfig\n\ndef f(config: RunConfig) -> None: ...\n"
    assert len(_names_the_config(ast.parse(source))) == 2
