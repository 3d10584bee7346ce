"""A reviewer's decisions file, read and checked: the CSV the report's review page exports
(`job_id,row,prediction_id,decision,note`), or one written by hand or by another tool with
at least `row` and `decision`. A file that breaks a rule is refused whole, naming its line,
field and rule, before anything is sent."""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core import DECISION_COLUMNS, REVIEWS, ConfigError, Decision, from_sheet

__all__ = ["read_decisions", "refused"]

_WORDS = {
    "approve": "approved",
    "approved": "approved",
    "reject": "rejected",
    "rejected": "rejected",
}
_SHOWN = 10  # problems named in one message


def read_decisions(path: Path) -> list[Decision]:
    """The decisions in `path`, in file order, read line by line; lines with a blank decision
    are not decided and left out. ConfigError naming each problem (at most ten) when the file
    breaks a rule."""
    with _lines(path) as lines:
        first = next(lines, None)
        if first is None:
            raise ConfigError(
                f"decisions file {path} is empty; it needs a header with row,decision"
            )
        header = [name.strip().lower() for name in first]
        missing = [name for name in ("row", "decision") if name not in header]
        if missing == ["row"] and "job_id" in header:
            missing = []  # each line names its edit by job_id (and prediction_id)
        if missing:
            raise ConfigError(
                f"decisions file {path} line 1 has no {' or '.join(missing)} column; the header "
                f"reads {','.join(header)}; expected {','.join(DECISION_COLUMNS)}"
            )
        at = {name: header.index(name) for name in DECISION_COLUMNS if name in header}
        decisions, problems = _read(lines, at)
    if problems:
        raise refused(path, problems)
    return decisions


def _read(lines: Iterator[list[str]], at: dict[str, int]) -> tuple[list[Decision], list[str]]:
    decisions: list[Decision] = []
    problems: list[str] = []
    first_line: dict[int | str, int] = {}
    for number, cells in enumerate(lines, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        found = _decision(cells, at, number, problems)
        if found is None:
            continue
        key = found.row_number or str(found.job_id)
        if key in first_line:
            named = f"row {key}" if found.row_number else f"job_id {key!r}"
            field = "row" if found.row_number else "job_id"
            problems.append(
                f"line {number}, field {field}: {named} is decided twice "
                f"(lines {first_line[key]} and {number}); keep one"
            )
            continue
        first_line[key] = number
        if problems:
            decisions.clear()  # the file is refused: only its problems are kept, not its lines
        else:
            decisions.append(found)
    return decisions, problems


def refused(path: Path, problems: list[str], then: str = "") -> ConfigError:
    """The error that refuses a decisions file: its first ten problems, how many more, and
    `then` (what follows for the user)."""
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return ConfigError(f"decisions file {path}: " + "; ".join(problems[:_SHOWN]) + more + then)


@contextmanager
def _lines(path: Path) -> Iterator[Iterator[list[str]]]:
    """The file's lines split into cells, read as they come: UTF-8 (with or without a BOM)
    or UTF-16 with a BOM (Excel's "Unicode text"), comma-, semicolon- (Excel where the comma
    is the decimal mark) or tab-separated, as its header line shows."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise ConfigError(f"decisions file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"decisions file {path} cannot be read: {exc}") from None
    with handle:
        bom = handle.read(2)
        handle.seek(0)
        encoding = "utf-16" if bom in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
        text = io.TextIOWrapper(handle, encoding=encoding, newline="")
        try:
            header = text.readline()
            delimiter = max(",;\t", key=header.count)
            yield _cells(path, itertools.chain([header], text), delimiter)
        except UnicodeDecodeError:
            raise ConfigError(
                f"decisions file {path} is not UTF-8 text; save it as CSV UTF-8 (the review "
                "page's export is)"
            ) from None
        except OSError as exc:
            raise ConfigError(f"decisions file {path} cannot be read: {exc}") from None


def _cells(path: Path, text: Iterator[str], delimiter: str) -> Iterator[list[str]]:
    try:
        for cells in csv.reader(text, delimiter=delimiter):
            yield [from_sheet(cell) for cell in cells]
    except csv.Error as exc:
        raise ConfigError(f"decisions file {path} cannot be read as CSV: {exc}") from None


def _cell(cells: list[str], at: dict[str, int], name: str) -> str:
    index = at.get(name)
    return cells[index].strip() if index is not None and index < len(cells) else ""


def _decision(
    cells: list[str], at: dict[str, int], number: int, problems: list[str]
) -> Decision | None:
    """One line's decision; None (with the problem noted) when it breaks a rule, or when its
    decision is blank (not decided)."""
    word = _cell(cells, at, "decision")
    if not word:
        return None
    decision = _WORDS.get(word.lower())
    if decision not in REVIEWS:
        problems.append(f"line {number}, field decision: {word!r} is not {' or '.join(REVIEWS)}")
        return None
    row = _cell(cells, at, "row")
    job_id = _cell(cells, at, "job_id") or None
    if not row and job_id is not None:
        row = "0"  # named by its job id alone: its row is looked up in the run
    elif not (row.isascii() and row.isdigit()) or int(row) < 1:  # `²` is a digit, not a number
        problems.append(f"line {number}, field row: {row!r} is not a row number (1 or more)")
        return None
    return Decision(
        row_number=int(row),
        job_id=job_id,
        decision=decision,
        note=_cell(cells, at, "note"),
        prediction_id=_cell(cells, at, "prediction_id") or None,
        line=number,
    )
