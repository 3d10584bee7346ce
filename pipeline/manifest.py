"""The manifest: CSV or Parquet rows read as a stream of batches, each row checked and mapped.

A row becomes a `JobSpec` (the API input it will send) or a `Rejected` (the field and the rule it
breaks); a bad row never stops the run. Problems with the file as a whole (missing, unreadable,
a mapped column absent) raise `ManifestError` before anything is sent.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ManifestSection
from pipeline.errors import ManifestError
from pipeline.models import JobSpec, Rejected
from pipeline.schema import IMAGE_FIELDS, INPUT_FIELDS, check_input, fingerprint

__all__ = ["Manifest", "RowMapper"]

_INT_FIELDS = ("n", "seed")
_FIRST_BATCH = 200


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            return int(text)
    return None


def _coerce(field: str, value: Any) -> tuple[Any, str | None]:
    """The API value for a manifest cell, or the rule it breaks."""
    if field in _INT_FIELDS:
        number = _to_int(value)
        if number is None:
            return None, f"must be an integer, not {value!r}"
        return number, None
    if not isinstance(value, str):
        return None, f"must be text, not {type(value).__name__} {value!r}"
    if field == "size":
        return value.strip().upper(), None
    if field in IMAGE_FIELDS:
        return value.strip(), None
    return value, None


@dataclass(frozen=True, slots=True)
class RowMapper:
    """Turns one manifest record into the API input it sends, or the reason it cannot."""

    model: str
    columns: dict[str, str]  # API field -> manifest column
    defaults: dict[str, Any]
    id_column: str | None
    allow_loopback: bool

    def map(self, row_number: int, record: dict[str, Any]) -> JobSpec | Rejected:
        job_id = self._job_id(row_number, record)
        if self.id_column is not None and _is_blank(record.get(self.id_column)):
            return Rejected(
                job_id,
                row_number,
                record,
                f"row {row_number}: id column {self.id_column!r} is empty",
            )
        inputs: dict[str, Any] = {}
        problems: list[str] = []
        for field in INPUT_FIELDS:
            column = self.columns.get(field)
            value = record.get(column) if column is not None else None
            if _is_blank(value):
                if field in self.defaults:
                    inputs[field] = self.defaults[field]
                continue
            coerced, rule = _coerce(field, value)
            if rule is not None:
                problems.append(f"{field} (column {column!r}): {rule}")
            else:
                inputs[field] = coerced
        if not problems:
            for violation in check_input(inputs, allow_loopback=self.allow_loopback):
                column = self.columns.get(violation.field)
                where = f" (column {column!r})" if column else ""
                problems.append(f"{violation.field}{where}: {violation.rule}")
        if problems:
            return Rejected(job_id, row_number, record, f"row {row_number}: " + "; ".join(problems))
        return JobSpec(job_id, row_number, inputs, record, fingerprint(self.model, inputs))

    def _job_id(self, row_number: int, record: dict[str, Any]) -> str:
        if self.id_column is not None and not _is_blank(record.get(self.id_column)):
            return str(record[self.id_column]).strip()
        blob = json.dumps(record, sort_keys=True, default=str).encode()
        return f"row-{row_number}-{hashlib.sha256(blob).hexdigest()[:8]}"


class Manifest:
    """A manifest file: its columns, and its rows as batches of `JobSpec | Rejected`."""

    def __init__(self, section: ManifestSection, *, model: str, allow_loopback: bool) -> None:
        self.path = section.path
        self.kind = section.kind
        self.batch_rows = section.batch_rows
        if not self.path.is_file():
            raise ManifestError(f"manifest {self.path} does not exist or is not a file")
        self.columns = self._read_columns()
        if section.id_column is not None and section.id_column not in self.columns:
            raise ManifestError(
                f"manifest {self.path}: id_column {section.id_column!r} is not a column "
                f"(columns: {', '.join(self.columns)})"
            )
        mapping = {f: f for f in INPUT_FIELDS if f in self.columns}
        mapping.update(section.columns)
        for field, column in section.columns.items():
            if column not in self.columns:
                raise ManifestError(
                    f"manifest {self.path}: columns.{field} names column {column!r}, which the "
                    f"manifest does not have (columns: {', '.join(self.columns)})"
                )
        for field in ("prompt", "img_url"):
            if field not in mapping and field not in section.defaults:
                raise ManifestError(
                    f"manifest {self.path}: no column gives the required field {field!r}; "
                    f"map one under manifest.columns.{field}"
                )
        self.mapper = RowMapper(
            model, mapping, dict(section.defaults), section.id_column, allow_loopback
        )
        mapped = set(mapping.values()) | ({section.id_column} if section.id_column else set())
        self.extra_columns = [c for c in self.columns if c not in mapped]

    def _read_columns(self) -> list[str]:
        try:
            if self.kind == "parquet":
                return list(pq.ParquetFile(self.path).schema_arrow.names)
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), None)
        except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
            raise ManifestError(f"cannot read manifest {self.path}: {exc}") from None
        if not header:
            raise ManifestError(f"manifest {self.path} is empty (no header row)")
        header = [name.strip() for name in header]
        if len(set(header)) != len(header):
            raise ManifestError(f"manifest {self.path} has a repeated column name: {header}")
        return header

    def records(self, start_row: int = 1) -> Iterator[list[tuple[int, dict[str, Any] | str]]]:
        """Batches of (row number, record), or (row number, reason) for an unreadable row."""
        if self.kind == "parquet":
            yield from self._parquet_records(start_row)
        else:
            yield from self._csv_records(start_row)

    def _parquet_records(self, start_row: int) -> Iterator[list[tuple[int, dict[str, Any] | str]]]:
        row_number = 0
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=self.batch_rows):
            if row_number + batch.num_rows < start_row:
                row_number += batch.num_rows
                continue
            out: list[tuple[int, dict[str, Any] | str]] = []
            for record in batch.to_pylist():
                row_number += 1
                if row_number >= start_row:
                    out.append((row_number, record))
            yield out

    def _csv_records(self, start_row: int) -> Iterator[list[tuple[int, dict[str, Any] | str]]]:
        width = len(self.columns)
        out: list[tuple[int, dict[str, Any] | str]] = []
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                for row_number, cells in enumerate(reader, start=1):
                    if row_number < start_row or not cells:
                        continue
                    if len(cells) != width:
                        out.append(
                            (
                                row_number,
                                f"row {row_number}: has {len(cells)} fields; "
                                f"the header has {width}",
                            )
                        )
                    else:
                        out.append((row_number, dict(zip(self.columns, cells, strict=True))))
                    if len(out) >= self.batch_rows:
                        yield out
                        out = []
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ManifestError(
                f"manifest {self.path} cannot be read past row "
                f"{out[-1][0] if out else start_row}: {exc}"
            ) from None
        if out:
            yield out

    def batches(self, start_row: int = 1) -> Iterator[list[JobSpec | Rejected]]:
        """Checked rows in batches: small ones first, so the first creates need not wait for a
        whole batch to be read and journaled, then growing to `batch_rows`."""
        size = min(self.batch_rows, _FIRST_BATCH)
        for records in self.records(start_row):
            begin = 0
            while begin < len(records):
                chunk = records[begin : begin + size]
                begin += len(chunk)
                yield [self._item(number, record) for number, record in chunk]
                size = min(self.batch_rows, size * 4)

    def _item(self, row_number: int, record: dict[str, Any] | str) -> JobSpec | Rejected:
        if isinstance(record, str):
            return Rejected(f"row-{row_number}", row_number, {}, record)
        return self.mapper.map(row_number, record)
