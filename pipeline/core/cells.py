"""What a manifest cell holds, read the same way by the intake and the results: blank, or an
integer written as one."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["ZERO_WIDTH", "from_sheet", "is_blank", "to_int", "to_sheet"]

ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_INTEGER = re.compile(r"[+-]?[0-9]+(?:\.0*)?")
# what a spreadsheet reads as a formula at a cell's start (OWASP's CSV injection guidance)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def is_blank(value: Any) -> bool:
    """Empty, null, NaN, or only whitespace and zero-width characters."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip().strip(ZERO_WIDTH).strip()
    if isinstance(value, list | tuple):
        return all(is_blank(v) for v in value)
    return False


def to_int(value: Any) -> int | None:
    """An integer written as one (`5`, `+5`, `5.0`, 5, 5.0), or None: `--5`, `²`, `①`, 5.5,
    NaN and text are not integers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and _INTEGER.fullmatch(text):
            return int(text.split(".", 1)[0])
    return None


def to_sheet(value: object) -> object:
    """A CSV cell safe to open in a spreadsheet: text that starts with `=`, `+`, `-`, `@`, a
    tab or a carriage return gets a leading `'` (a number such as `-5` stays a number);
    `from_sheet` reads it back as written."""
    if isinstance(value, str) and value.startswith(_FORMULA) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def from_sheet(text: str) -> str:
    """A cell `to_sheet` neutralised, as it was written."""
    if text.startswith("'") and text[1:].startswith(_FORMULA) and not _NUMBER.fullmatch(text[1:]):
        return text[1:]
    return text
