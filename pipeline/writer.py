"""Results out of the journal: `results.parquet` (one row per manifest row) and the failures
manifest (the failed and rejected rows, in the input's own columns and format, ready to be run
again). Both are written to a temporary file and moved into place, so a reader never sees half.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from pipeline.journal import Journal
from pipeline.schema import IMAGE_FIELDS

if TYPE_CHECKING:
    import sqlite3

__all__ = ["ResultLayout", "write_failures", "write_results"]


@dataclass(frozen=True, slots=True)
class ResultLayout:
    """What the results need to know of the manifest."""

    id_column: str | None
    columns: dict[str, str]  # API field -> manifest column
    extra_columns: list[str]
    manifest_columns: list[str]
    manifest_kind: str
    manifest_path: Path


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_TS = pa.timestamp("us", tz="UTC")
# the earlier outcomes of a row that `wanbatch retry` ran again, oldest first
_HISTORY = pa.list_(
    pa.struct(
        [
            pa.field("status", pa.string()),
            pa.field("error_type", pa.string()),
            pa.field("error_message", pa.string()),
            pa.field("prediction_id", pa.string()),
            pa.field("attempts", pa.int64()),
            pa.field("finished_at", _TS),
        ]
    )
)


# the columns the journal's `outcome` object holds (Journal.result_rows)
_OUTCOME = frozenset(
    {
        "job_id",
        "row_number",
        "status",
        "prediction_id",
        "output_urls",
        "images",
        "cost_usd",
        "predict_time_s",
        "latency_s",
        "attempts",
        "ambiguous_creates",
        "possible_duplicate_charge",
        "reused",
        "error_type",
        "error_message",
        "created_at",
        "finished_at",
        "key",
    }
)


def _schema(layout: ResultLayout) -> pa.Schema:
    base = _base_fields(layout)
    return pa.schema(base + [pa.field(name, pa.string()) for _, name in _extra_names(layout, base)])


def _base_fields(layout: ResultLayout) -> list[pa.Field]:
    fields = [
        pa.field("job_id", pa.string()),
        pa.field("row_number", pa.int64()),
    ]
    if layout.id_column and layout.id_column not in _OUTCOME:
        fields.append(pa.field(layout.id_column, pa.string()))
    fields += [
        pa.field("prompt", pa.string()),
        pa.field("img_urls", pa.list_(pa.string())),
        pa.field("size", pa.string()),
        pa.field("n", pa.int64()),
        pa.field("seed", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("prediction_id", pa.string()),
        pa.field("output_urls", pa.list_(pa.string())),
        pa.field("images", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("predict_time_s", pa.float64()),
        pa.field("latency_s", pa.float64()),
        pa.field("attempts", pa.int64()),
        pa.field("ambiguous_creates", pa.int64()),
        pa.field("possible_duplicate_charge", pa.bool_()),
        pa.field("reused", pa.bool_()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("created_at", _TS),
        pa.field("finished_at", _TS),
        pa.field("key", pa.string()),
        pa.field("history", _HISTORY),
    ]
    return fields


def _extra_names(layout: ResultLayout, fields: list[pa.Field]) -> list[tuple[str, str]]:
    """Each extra manifest column and its results name: its own, or `manifest_<name>` where
    a results column already has it."""
    taken = {f.name for f in fields}
    return [(c, c if c not in taken else f"manifest_{c}") for c in layout.extra_columns]


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class _Names:
    own: frozenset[str]  # the id column, when it is a results column of its own
    extras: list[tuple[str, str]]  # extra manifest column -> results name


def _names(layout: ResultLayout) -> _Names:
    own = {layout.id_column} if layout.id_column and layout.id_column not in _OUTCOME else set()
    return _Names(frozenset(own), _extra_names(layout, _base_fields(layout)))


def _result_line(row: sqlite3.Row, layout: ResultLayout, names: _Names) -> str:
    """One results row as a JSON line: the journal's `outcome` object, with the columns that
    come from the row's inputs (or, for a rejected row, from what the manifest said) added."""
    record = json.loads(row["record"])
    if row["inputs"] is not None:
        inputs = json.loads(row["inputs"])
    else:  # a rejected row: show what the manifest said
        inputs = {f: record.get(c) for f, c in layout.columns.items()}
    out: dict[str, Any] = {
        "prompt": _text(inputs.get("prompt")),
        "img_urls": [str(inputs[f]) for f in IMAGE_FIELDS if inputs.get(f)],
        "size": _text(inputs.get("size")),
        "n": _as_int(inputs.get("n")),
        "seed": _as_int(inputs.get("seed")),
        "history": _history(row["history"]),
    }
    if layout.id_column in names.own:
        out[layout.id_column] = _text(record.get(layout.id_column))
    for column, name in names.extras:
        out[name] = _text(record.get(column))
    outcome: str = row["outcome"]
    return f"{outcome[:-1]},{_ENCODE(out)[1:]}"


def _micros(seconds: float | None) -> int | None:
    """A journal time (epoch seconds) as a Parquet timestamp (epoch microseconds)."""
    return int(seconds * 1e6) if seconds else None


def _history(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    return [{**h, "finished_at": _micros(h.get("finished_at"))} for h in json.loads(text)]


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _as_micros(kind: pa.DataType) -> pa.DataType:
    """`kind` with its timestamps as int64 microseconds, the form they are parsed in."""
    if pa.types.is_timestamp(kind):
        return pa.int64()
    if pa.types.is_list(kind):
        return pa.list_(_as_micros(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_as_micros(f.type)) for f in kind])
    return kind


def _to_table(lines: list[str], schema: pa.Schema, parsed: pa.Schema) -> pa.Table:
    """JSON lines as a table, through Arrow's JSON reader: building arrays from Python objects
    (`Table.from_pylist`) makes pyarrow import pandas, about 0.4 s of CPU per run."""
    data = "\n".join(lines).encode()
    table = pj.read_json(
        pa.BufferReader(data),
        read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1),
        parse_options=pj.ParseOptions(explicit_schema=parsed, unexpected_field_behavior="error"),
    )
    return table.select(schema.names).cast(schema)


def write_results(journal: Journal, layout: ResultLayout, path: Path) -> int:
    """Write every journaled job as one results row; the number of rows written."""
    schema = _schema(layout)
    parsed = pa.schema([f.with_type(_as_micros(f.type)) for f in schema])
    count = 0
    with _atomic(path) as tmp, pq.ParquetWriter(tmp, schema) as out:
        names = _names(layout)
        for batch in journal.result_rows():
            out.write_table(
                _to_table([_result_line(r, layout, names) for r in batch], schema, parsed)
            )
            count += len(batch)
        if count == 0:
            out.write_table(schema.empty_table())
    return count


def write_failures(journal: Journal, layout: ResultLayout, run_dir: Path) -> Path | None:
    """The failed and rejected rows as a manifest of the input's columns; None if there are none."""
    suffix = "parquet" if layout.manifest_kind == "parquet" else "csv"
    path = run_dir / f"failures.{suffix}"
    records = (json.loads(r["record"]) for batch in journal.failed_records() for r in batch)
    first = next(records, None)
    if first is None:
        path.unlink(missing_ok=True)
        return None
    columns = layout.manifest_columns
    with _atomic(path) as tmp:
        if suffix == "csv":
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for record in (first, *records):
                    writer.writerow(
                        ["" if record.get(c) is None else record.get(c) for c in columns]
                    )
        else:
            original = pq.read_schema(layout.manifest_path)
            table = pa.Table.from_pylist(
                [{c: r.get(c) for c in columns} for r in (first, *records)]
            )
            # keep the types the records have when the original ones do not fit
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                table = table.cast(original)
            pq.write_table(table, tmp)
    return path
