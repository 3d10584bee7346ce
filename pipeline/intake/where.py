"""`manifest.where`: a row filter over the catalog's columns, read by our own small parser.

    Published == 1 and Status in ["active", "draft"]
    `Variant Inventory Qty` > 0 or not (Type == null)

Comparisons `== != < <= > >=`, `in [...]` and `not in [...]`, `and`, `or`, `not` and parentheses;
strings in single or double quotes, numbers, `null` (a blank cell is null), `true` and `false`;
a column name as a bare word (letters, digits, `_`, `.` for a struct's field) or in backticks
for any other. Nothing is evaluated as Python. A number compares with a cell as a number when the
cell reads as one, else as text; text compares as text, after trimming the cell's spaces.

A bad expression raises `WhereError` naming the position (1-based character) and what was
expected there, before anything is read or sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.core import is_blank

__all__ = ["Filter", "WhereError", "compile_where"]

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<quoted>`[^`]*`)
    | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
    | (?P<word>[A-Za-z_][A-Za-z0-9_.]*(?:\[\d+\])*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "null", "true", "false"}
Cell = Callable[[dict[str, Any], str], Any]


class WhereError(ValueError):
    """The expression cannot be read: where and why."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"at character {position}: {message}")
        self.position = position


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number, string, column, op, keyword, end
    text: str
    at: int  # 1-based


def _tokens(text: str) -> list[_Token]:
    out, at = [], 0
    while at < len(text):
        if not text[at:].strip():
            break
        found = _TOKEN.match(text, at)
        if found is None or found.end() == at:
            spot = at + len(text[at:]) - len(text[at:].lstrip())
            raise WhereError(spot + 1, f"cannot read {text[spot : spot + 12]!r}")
        kind = str(found.lastgroup)
        start = found.start(kind) + 1
        value = found.group(kind)
        if kind == "word":
            kind = "keyword" if value.lower() in _KEYWORDS else "column"
            value = value.lower() if kind == "keyword" else value
        elif kind == "quoted":
            kind, value = "column", value[1:-1]
        out.append(_Token(kind, value, start))
        at = found.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


Predicate = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled `manifest.where`: `keeps(record)` and the columns it reads."""

    text: str
    columns: tuple[str, ...]
    keeps: Predicate


def compile_where(text: str, cell: Cell | None = None) -> Filter:
    """The filter `text` says; `cell(record, column)` reads a column (by default, its key)."""
    parser = _Parser(_tokens(text), cell or (lambda record, column: record.get(column)))
    predicate = parser.either()
    parser.expect("end", "the end of the expression (an `and` or `or` is missing?)")
    return Filter(text, tuple(dict.fromkeys(parser.columns)), predicate)


class _Parser:
    """Recursive descent: either := both (or both)*; both := one (and one)*;
    one := not one | ( either ) | column op value | column [not] in [values]."""

    def __init__(self, tokens: list[_Token], cell: Cell) -> None:
        self._tokens: Iterator[_Token] = iter(tokens)
        self._next = next(self._tokens)
        self._cell = cell
        self.columns: list[str] = []

    def _take(self) -> _Token:
        token, self._next = self._next, next(self._tokens, self._next)
        return token

    def _is(self, kind: str, text: str | None = None) -> bool:
        return self._next.kind == kind and (text is None or self._next.text == text)

    def expect(self, kind: str, what: str, text: str | None = None) -> _Token:
        if not self._is(kind, text):
            found = self._next.text or "the end"
            raise WhereError(self._next.at, f"expected {what}, found {found!r}")
        return self._take()

    def either(self) -> Predicate:
        parts = [self._both()]
        while self._is("keyword", "or"):
            self._take()
            parts.append(self._both())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def _both(self) -> Predicate:
        parts = [self._one()]
        while self._is("keyword", "and"):
            self._take()
            parts.append(self._one())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def _one(self) -> Predicate:
        if self._is("keyword", "not"):
            self._take()
            inner = self._one()
            return lambda r: not inner(r)
        if self._is("op", "("):
            self._take()
            inner = self.either()
            self.expect("op", "')'", ")")
            return inner
        column = self.expect("column", "a column name (in backticks if it holds spaces)").text
        self.columns.append(column)
        cell = self._cell
        if self._is("keyword", "not") or self._is("keyword", "in"):
            negate = self._take().text == "not"
            if negate:
                self.expect("keyword", "'in' after 'not'", "in")
            values = self._list()
            return lambda r: _among(cell(r, column), values) != negate
        op = self.expect("op", "a comparison (== != < <= > >=) or 'in'").text
        if op in "()[],":
            raise WhereError(self._next.at, f"expected a comparison, found {op!r}")
        value = self._value()
        return lambda r: _compare(cell(r, column), op, value)

    def _value(self) -> Any:
        token = self._take()
        if token.kind == "number":
            return float(token.text)
        if token.kind == "string":
            return re.sub(r"\\(.)", r"\1", token.text[1:-1])
        if token.kind == "keyword" and token.text in ("null", "true", "false"):
            return {"null": None, "true": True, "false": False}[token.text]
        found = token.text or "the end"
        raise WhereError(
            token.at, f"expected a value (text in quotes, a number or null), found {found!r}"
        )

    def _list(self) -> list[Any]:
        self.expect("op", "'[' to open the list", "[")
        values = [self._value()]
        while self._is("op", ","):
            self._take()
            values.append(self._value())
        self.expect("op", "',' or ']'", "]")
        return values


def _number(cell: Any) -> float | None:
    if isinstance(cell, bool):
        return float(cell)
    if isinstance(cell, int | float):
        return float(cell) if not (isinstance(cell, float) and math.isnan(cell)) else None
    if isinstance(cell, str):
        try:
            found = float(cell.strip().replace(",", "")) if cell.strip() else None
        except ValueError:
            return None
        return found if found is not None and math.isfinite(found) else None
    return None


def _text(cell: Any) -> str:
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    return str(cell).strip()


def _equal(cell: Any, value: Any) -> bool:
    if value is None:
        return is_blank(cell)
    if is_blank(cell):
        return False
    if isinstance(value, bool):
        if isinstance(cell, bool):
            return cell is value
        return _text(cell).lower() in (("true", "yes", "1") if value else ("false", "no", "0"))
    if isinstance(value, float):
        number = _number(cell)
        return number == value if number is not None else _text(cell) == _text(value)
    return bool(_text(cell) == value)


def _among(cell: Any, values: list[Any]) -> bool:
    return any(_equal(cell, v) for v in values)


def _compare(cell: Any, op: str, value: Any) -> bool:
    if op == "==":
        return _equal(cell, value)
    if op == "!=":
        return not _equal(cell, value)
    if value is None or is_blank(cell):
        return False  # nothing is less or more than a blank
    left: Any
    right: Any
    if isinstance(value, float):
        left, right = _number(cell), value
        if left is None:
            return False  # text is not ordered against a number
    else:
        left, right = _text(cell), str(value)
    return bool(
        {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    )
