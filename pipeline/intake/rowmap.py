"""One manifest row to the API input it sends: cells read as a person would read them.

A cell is blank when it is empty, null, NaN, whitespace or zero-width characters only. An image
cell may hold several images (a Parquet list, or text with several URLs separated by commas or
whitespace; a URL's own commas stay in it): they fill the field it is mapped to and the image
fields after it, in order. A prompt may be built from the row (`manifest.prompt_template`). A
row is skipped (never sent, no failure) when a field of `manifest.skip_if_blank` is blank, and
rejected, naming the row, the column and the rule, when a cell breaks a rule: whatever a cell
holds, the mapper returns a value and never raises.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core import (
    IMAGE_FIELDS,
    INPUT_FIELDS,
    ZERO_WIDTH,
    JobSpec,
    Rejected,
    check_input,
    fingerprint,
    is_blank,
    to_int,
)
from pipeline.intake.inputs import input_kind
from pipeline.intake.urls import tidy_image
from pipeline.intake.where import Filter

__all__ = ["PromptTemplate", "RowMapper", "cell", "is_blank", "split_images", "to_int"]

_INT_FIELDS = ("n", "seed")
# where one image ends and the next begins in a text cell: a comma and a space (as galleries
# are joined), or a comma or whitespace before the next URL's scheme; a comma inside a URL
# (`?tr=w_800,h_800`) is followed by neither, and a space inside one (`summer sale/1.jpg`) by
# no scheme
_NEXT_IMAGE = re.compile(r"\s*,\s+|(?:\s*,\s*|\s+)(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def cell(record: dict[str, Any], column: str) -> Any:
    """A column's value in a record: a column of that name, else a path into a struct or a
    list (`media.hero`, `media.gallery[0]`); None when the path leads nowhere."""
    if column in record:
        return record[column]
    value: Any = record
    for step in _STEP.finditer(column):
        key, index = step.groups()
        if key is not None:
            value = value.get(key) if isinstance(value, dict) else None
        elif isinstance(value, list | tuple):
            value = value[int(index)] if int(index) < len(value) else None
        else:
            value = None
        if value is None:
            return None
    return value


def path_root(column: str) -> str:
    """The column a dotted or indexed name starts from (`media` of `media.gallery[0]`)."""
    return re.split(r"[.\[]", column, maxsplit=1)[0]


def split_images(value: Any) -> tuple[list[str], str | None]:
    """The images a cell names, in order, or the rule it breaks."""
    if isinstance(value, list | tuple):
        images: list[str] = []
        for item in value:
            if is_blank(item):
                continue
            if not isinstance(item, str):
                return [], f"must hold text URLs, not {type(item).__name__} {_shown(item)}"
            images += split_images(item)[0]
        return images, None
    if not isinstance(value, str):
        return [], f"must be text, not {type(value).__name__} {_shown(value)}"
    parts = (p.strip().strip(ZERO_WIDTH).rstrip(",;").strip() for p in _NEXT_IMAGE.split(value))
    return [p for p in parts if p], None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """`manifest.prompt_template`: text with `{Column Name}` fields filled from the row, the
    values put in as they are (braces, `#` or `:` in a value stay text); `{{` and `}}` are
    literal braces."""

    text: str

    @property
    def columns(self) -> list[str]:
        return [m.group(1) for m in _FIELD.finditer(self.text) if m.group(1) is not None]

    def fill(self, record: dict[str, Any]) -> tuple[str | None, str | None]:
        """The prompt, or the rule the row breaks (a blank or non-text field)."""
        problems: list[str] = []

        def value(match: re.Match[str]) -> str:
            if match.group(1) is None:
                return match.group()[0]  # {{ or }}
            found = cell(record, match.group(1))
            if is_blank(found):
                problems.append(f"column {match.group(1)!r} is blank")
                return ""
            if isinstance(found, list | tuple | dict):
                problems.append(f"column {match.group(1)!r} holds {type(found).__name__}")
                return ""
            return found if isinstance(found, str) else str(found)

        filled = _FIELD.sub(value, self.text)
        if problems:
            return None, "; ".join(f"prompt_template: {p}" for p in problems)
        return filled, None


def _coerce(field: str, value: Any) -> tuple[Any, str | None]:
    """The API value of a field that is not an image, or the rule it breaks."""
    if field in _INT_FIELDS:
        number = to_int(value)
        if number is None:
            return None, f"must be an integer, not {_shown(value)}"
        return number, None
    if not isinstance(value, str):
        return None, f"must be text, not {type(value).__name__} {_shown(value)}"
    if field == "size":
        return value.strip().upper(), None
    return value, None


@dataclass(frozen=True, slots=True)
class RowMapper:
    """Turns one manifest record into the API input it sends, or the reason it cannot."""

    model: str
    columns: dict[str, str]  # API field -> manifest column
    defaults: dict[str, Any]
    id_columns: tuple[str, ...]
    allow_loopback: bool
    prompt_template: PromptTemplate | None = None
    skip_if_blank: tuple[str, ...] = ()  # API fields
    extra_images: Literal["reject", "keep_first"] = "reject"
    where: Filter | None = None  # manifest.where: rows it leaves out are skipped
    url_base: str | None = None  # manifest.url_base: a relative image path is joined to it

    @property
    def id_column(self) -> str | None:
        return self.id_columns[0] if len(self.id_columns) == 1 else None

    def map(self, row_number: int, record: dict[str, Any]) -> JobSpec | Rejected:
        job_id = self.job_id(row_number, record)
        if skipped := self._skipped(record):
            return Rejected(job_id, row_number, record, f"row {row_number}: {skipped}", True)
        if self.id_columns and all(is_blank(cell(record, c)) for c in self.id_columns):
            named = ", ".join(repr(c) for c in self.id_columns)
            reason = f"row {row_number}: id column {named} is empty"
            return Rejected(job_id, row_number, record, reason)
        inputs, problems = self._inputs(record)
        if not problems:
            for violation in check_input(inputs, allow_loopback=self.allow_loopback):
                value = inputs.get(violation.field)
                if violation.field in IMAGE_FIELDS and _read_by_us(value):
                    continue  # a local file or an object: judged and uploaded by InputStage
                where = self._where(violation.field)
                problems.append(f"{violation.field}{where}: {violation.rule}")
        if problems:
            return Rejected(job_id, row_number, record, f"row {row_number}: " + "; ".join(problems))
        return JobSpec(job_id, row_number, inputs, record, fingerprint(self.model, inputs))

    def _skipped(self, record: dict[str, Any]) -> str | None:
        if self.where is not None and not self.where.keeps(record):
            return f"filtered: skipped (manifest.where: {self.where.text})"
        for field in self.skip_if_blank:
            column = self.columns.get(field)
            if column is not None and is_blank(cell(record, column)):
                return f"{field} (column {column!r}) is blank: skipped (manifest.skip_if_blank)"
        return None

    def _where(self, field: str) -> str:
        if field == "prompt" and self.prompt_template is not None:
            return " (manifest.prompt_template)"
        column = self.columns.get(field)
        return f" (column {column!r})" if column else ""

    def _inputs(self, record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        inputs: dict[str, Any] = {}
        problems: list[str] = []
        for field in INPUT_FIELDS:
            if field in IMAGE_FIELDS:
                continue
            if field == "prompt" and self.prompt_template is not None:
                prompt, rule = self.prompt_template.fill(record)
                if rule is not None:
                    problems.append(rule)
                else:
                    inputs["prompt"] = prompt
                continue
            column = self.columns.get(field)
            value = cell(record, column) if column is not None else None
            if is_blank(value):
                if field in self.defaults:
                    inputs[field] = self.defaults[field]
                continue
            coerced, rule = _coerce(field, value)
            if rule is not None:
                problems.append(f"{field} (column {column!r}): {rule}")
            else:
                inputs[field] = coerced
        images, rules = self._images(record)
        problems += rules
        inputs.update(images)
        return {f: inputs[f] for f in INPUT_FIELDS if f in inputs}, problems

    def _images(self, record: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
        """The image fields: each mapped cell's images fill its field and the ones after it."""
        slots: list[str | None] = [None] * len(IMAGE_FIELDS)
        problems: list[str] = []
        for index, field in enumerate(IMAGE_FIELDS):
            column = self.columns.get(field)
            value = cell(record, column) if column is not None else None
            if is_blank(value):
                if field in self.defaults and slots[index] is None:
                    slots[index] = str(self.defaults[field])
                continue
            found, rule = split_images(value)
            if rule is None:
                found, rule = self._tidy(found)
            if rule is not None:
                problems.append(f"{field} (column {column!r}): {rule}")
                continue
            free = [at for at in range(index, len(slots)) if slots[at] is None]
            if len(found) > len(free) and self.extra_images == "reject":
                problems.append(
                    f"{field} (column {column!r}) holds {len(found)} images; {field} and the "
                    f"image fields after it take {len(free)} (manifest.extra_images: keep_first "
                    "sends the first ones that fit)"
                )
                continue
            for at, image in zip(free, found, strict=False):
                slots[at] = image
        return {f: v for f, v in zip(IMAGE_FIELDS, slots, strict=True) if v is not None}, problems

    def _tidy(self, images: list[str]) -> tuple[list[str], str | None]:
        """Each image as it is sent (see `urls.tidy_image`), or the first rule one breaks."""
        tidied = []
        for image in images:
            sent, rule = tidy_image(image, self.url_base)
            if rule is not None:
                return [], f"{_shown(image)} {rule}"
            tidied.append(sent)
        return tidied, None

    def job_id(self, row_number: int, record: dict[str, Any]) -> str:
        """The row's id: its id columns' values joined by `/`, else its number and a hash."""
        parts = [cell(record, c) for c in self.id_columns]
        if parts and not all(is_blank(p) for p in parts):
            return "/".join("" if is_blank(p) else _id_part(p) for p in parts)
        blob = json.dumps(record, sort_keys=True, default=str).encode()
        return f"row-{row_number}-{hashlib.sha256(blob).hexdigest()[:8]}"


def _id_part(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a nullable integer column read as float
    return str(value).strip()


def _read_by_us(value: Any) -> bool:
    return isinstance(value, str) and input_kind(value) in ("file", "object")
