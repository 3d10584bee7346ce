"""The manifest: CSV, TSV or Parquet rows read as a stream of batches, each row checked and
mapped (see `rowmap`).

A row becomes a `JobSpec` (the API input it will send) or a `Rejected` (the field and the rule it
breaks, or why it is skipped); a bad row never stops the run, and no row vanishes: a quote that
never closes rejects its row, naming the line where it opened, and each line after it as unread.
Problems with the file as a whole (missing, unreadable, a repeated column name, a mapped column
absent) raise `ManifestError` before anything is sent.
"""

from __future__ import annotations

import csv
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import structlog

from pipeline.core import (
    INPUT_FIELDS,
    AssetsSection,
    JobSpec,
    ManifestError,
    ManifestSection,
    Rejected,
    from_sheet,
    is_blank,
)
from pipeline.intake.inputs import InputStage, open_uploads
from pipeline.intake.names import check_names, compile_filter, trimmed_names
from pipeline.intake.rowmap import PromptTemplate, RowMapper

__all__ = ["CELL_LIMIT", "Manifest", "RowMapper"]

_FIRST_BATCH = 200
# the most characters in one CSV cell: Python's csv default, kept as a rule that rejects the row
CELL_LIMIT = 131_072
_CSV_READ_LIMIT = 1 << 24  # csv itself reads fields up to this, so CELL_LIMIT can name the column

# a row number, the record as read (cleaned of what cannot be kept), the rule the row breaks
Record = tuple[int, dict[str, Any], str | None]
Item = JobSpec | Rejected
_SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
# an Amazon flat file's first line; its column names are on line 3, under a line of labels
_AMAZON = re.compile(r"^\ufeff?\"?TemplateType=", re.IGNORECASE)
AMAZON_HEADER_ROW = 3


def amazon_flat_file(first_line: str) -> bool:
    """Whether a file's first line is an Amazon flat file's template line (its header is on
    line AMAZON_HEADER_ROW)."""
    return _AMAZON.match(first_line) is not None


def tabbed(header_line: str) -> bool:
    """Whether a header line is tab-separated (more tabs than commas), whatever its name."""
    return header_line.count("\t") > header_line.count(",")


# a shaped copy's column (see `shape`): why the export's row could not be read, when it could not
PROBLEM = "wanbatch_problem"
_PRODUCTS_KEPT = 100_000  # products whose first row fill_down remembers (the latest)
_log = structlog.get_logger("pipeline.intake.manifest")


def _undecodable(text: str) -> str | None:
    """Where a CSV cell read with surrogateescape held a byte that is not UTF-8, or None."""
    found = None if text.isascii() else _SURROGATE.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return f"byte 0x{byte:02x} at character {found.start() + 1} is not UTF-8"


def _replace_undecodable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _arrow_records(batch: pa.RecordBatch, first: int, start_row: int) -> list[Record]:
    """A Parquet batch's rows from `start_row` on; a value Python cannot hold (text that is
    not UTF-8) rejects its own row, naming the column."""
    skip = max(0, start_row - first)
    try:
        return [
            (first + skip + i, record, None)
            for i, record in enumerate(batch.slice(skip).to_pylist())
        ]
    except (pa.ArrowException, UnicodeDecodeError):
        pass
    out: list[Record] = []
    for index in range(skip, batch.num_rows):
        number, record, problems = first + index, {}, []
        for column, name in zip(batch.columns, batch.schema.names, strict=True):
            try:
                record[name] = column[index].as_py()
            except (pa.ArrowException, UnicodeDecodeError, ValueError) as exc:
                problems.append(f"column {name!r}: {exc}")
                record[name] = None
        out.append((number, record, f"row {number}: " + "; ".join(problems) if problems else None))
    return out


class Manifest:
    """A manifest file: its columns, and its rows as batches of `JobSpec | Rejected`."""

    def __init__(self, section: ManifestSection, *, model: str, allow_loopback: bool) -> None:
        self.path = section.path
        # how messages name it: the file the config names, though the run reads its copy
        self.shown = section.given or section.path
        self.kind = section.kind
        if self.kind == "xlsx":
            raise ManifestError(
                f"manifest {self.shown} is a spreadsheet: a run reads it through its copy "
                "(intake.shape), not directly"
            )
        self.batch_rows = section.batch_rows
        self._model = model
        self._check_urls = section.check_urls
        self._delimiter = section.separator
        self._encoding = section.encoding
        if not self.path.is_file():
            raise ManifestError(f"manifest {self.shown} does not exist or is not a file")
        self.header_line, tabs = self._sniff(section.header_row)
        if section.delimiter is None and self.kind == "csv" and tabs:
            self._delimiter = "\t"  # an Amazon flat file (.txt), a TSV saved as .csv
        self.columns = self._read_columns()
        section = trimmed_names(section, self.columns, self.shown)
        self.fill_down = section.fill_down
        template = PromptTemplate(section.prompt_template) if section.prompt_template else None
        mapping = {f: f for f in INPUT_FIELDS if f in self.columns}
        mapping.update(section.columns)
        if template is not None:
            mapping.pop("prompt", None)  # the template makes the prompt
        where = compile_filter(section.where, self.columns, self.shown)
        check_names(section, mapping, template, self.columns, self.shown)
        self.mapper = RowMapper(
            model,
            mapping,
            dict(section.defaults),
            section.id_columns,
            allow_loopback,
            template,
            tuple(section.skip_if_blank),
            section.extra_images,
            where,
            section.url_base,
        )
        # the columns beside ours in the results: every one but those that gave a field of
        # the same name (the results' own `prompt` is that column) and a lone id column
        same = {c for f, c in mapping.items() if f == c}
        own_id = {section.id_column_name} if section.id_column_name else set()
        self.extra_columns = [c for c in self.columns if c not in same | own_id | {PROBLEM}]
        # judges (and uploads) inputs that are not public URLs; set by the run that has uploads
        self.inputs: InputStage | None = None

    def _sniff(self, header_row: int | None) -> tuple[int | None, bool]:
        """The header's line (as given, or an Amazon flat file's, recognised by its first
        line; None: line 1) and whether it is tab-separated, from the file's first lines,
        read once."""
        if self.kind == "parquet":
            return header_row, False
        try:
            with self._open_csv() as handle:
                lines = [handle.readline() for _ in range(header_row or AMAZON_HEADER_ROW)]
        except (OSError, UnicodeError):
            return header_row, False  # the header's own read says why
        if header_row is None and amazon_flat_file(lines[0]):
            _log.info("amazon_flat_file", manifest=str(self.shown), header_row=AMAZON_HEADER_ROW)
            header_row = AMAZON_HEADER_ROW
        return header_row, tabbed(lines[(header_row or 1) - 1])

    def judge_inputs(
        self, a: AssetsSection, *, thumbs: Path | None = None, dry: bool = False
    ) -> None:
        """Judge the inputs that are not public URLs (and, with `manifest.check_urls`, those
        too) as rows are read: uploaded to `assets.upload_to` unless `dry` (an estimate). The
        bucket is checked first: ConfigError, before anything is sent."""
        uploads = open_uploads(a.upload_to, a.storage_options, a.upload_url_lifetime_s, dry=dry)
        if uploads is not None:
            uploads.check()
        self.inputs = InputStage(
            model=self._model,
            base_dir=self.shown.parent,  # a relative image path is the config's manifest's
            columns=self.mapper.columns,
            uploads=uploads,
            storage_options=a.storage_options,
            check_urls=self._check_urls,
            concurrency=a.concurrency,
            thumbs=thumbs,
        )

    def _read_columns(self) -> list[str]:
        try:
            if self.kind == "parquet":
                header = list(pq.ParquetFile(self.path).schema_arrow.names)
            else:
                with self._open_csv() as handle:
                    reader = self._reader(handle)
                    self._skip_template(reader)
                    header = next(reader, [])
        except (OSError, csv.Error, pa.ArrowException, UnicodeError) as exc:
            raise ManifestError(
                f"cannot read manifest {self.shown} (row 0, the header): {exc}"
            ) from None
        if not header:
            where = f" (manifest.header_row {self.header_line})" if self.header_line else ""
            raise ManifestError(f"manifest {self.shown} is empty (no header row{where})")
        self._raw_names = header
        header = [name.strip() for name in header]
        for index, name in enumerate(header, start=1):
            if bad := _undecodable(name):
                raise ManifestError(
                    f"manifest {self.shown}, row 0 (the header), column {index}: {bad}"
                )
        if len(set(header)) != len(header):
            repeated = sorted({n for n in header if header.count(n) > 1})
            hint = (
                ""
                if self.header_line
                else "; if the real header sits below template lines, "
                "set manifest.header_row to its line"
            )
            raise ManifestError(
                f"manifest {self.shown} has a repeated column name: "
                f"{', '.join(map(repr, repeated))}{hint}"
            )
        return header

    def _skip_template(self, reader: Iterator[list[str]]) -> None:
        """Pass the lines above the header (manifest.header_row, or an Amazon flat file's)."""
        for _ in range((self.header_line or 1) - 1):
            next(reader, None)

    def _open_csv(self) -> TextIO:
        # an undecodable byte is kept as a lone surrogate and found in its cell, so it rejects
        # its own row instead of ending the read wherever the decoder meets it
        return self.path.open(newline="", encoding=self._encoding, errors="surrogateescape")

    def _reader(self, handle: TextIO) -> Any:
        # strict: a quote that never closes raises at the end instead of swallowing the rest
        return csv.reader(handle, delimiter=self._delimiter, strict=True)

    def records(self, start_row: int = 1) -> Iterator[list[Record]]:
        """Batches of (row number, record, the rule the row breaks as a whole or None), with
        `manifest.fill_down` applied (read from the first row, so a resume fills as the
        first read did)."""
        first = 1 if self.fill_down is not None else start_row
        parquet = self.kind == "parquet"
        found = self._parquet_records(first) if parquet else self._csv_records(first)
        if self.fill_down is None:
            yield from found
            return
        filling = _FillDown(self.fill_down.by_columns, self.fill_down.columns)
        for batch in found:
            kept = [filling.fill(record) for record in batch]
            kept = [record for record in kept if record[0] >= start_row]
            if kept:
                yield kept

    def _parquet_records(self, start_row: int) -> Iterator[list[Record]]:
        """Row group by row group, so a group that cannot be read rejects its own rows only."""
        file = pq.ParquetFile(self.path)
        first = 1  # the row number of the group's first row
        for group in range(file.metadata.num_row_groups):
            size = file.metadata.row_group(group).num_rows
            done = first - 1
            if first + size > start_row:
                try:
                    for batch in file.iter_batches(batch_size=self.batch_rows, row_groups=[group]):
                        if self._raw_names != self.columns:  # names read without their spaces
                            batch = batch.rename_columns(self.columns)
                        yield _arrow_records(batch, done + 1, start_row)
                        done += batch.num_rows
                except (pa.ArrowException, OSError) as exc:
                    reason = f"cannot be read from the Parquet file (row group {group}): {exc}"
                    lost = range(max(done + 1, start_row), first + size)
                    for begin in range(0, len(lost), self.batch_rows):
                        chunk = lost[begin : begin + self.batch_rows]
                        yield [(n, {}, f"row {n}: {reason}") for n in chunk]
            first += size

    def _csv_records(self, start_row: int) -> Iterator[list[Record]]:
        if csv.field_size_limit() < _CSV_READ_LIMIT:
            csv.field_size_limit(_CSV_READ_LIMIT)  # cells over CELL_LIMIT are our rule, below
        out: list[Record] = []
        with self._open_csv() as handle:
            reader = self._reader(handle)
            self._skip_template(reader)
            next(reader, None)
            row_number = 0
            while True:
                opened = reader.line_num + 1  # the line the next row starts on
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:  # the reader goes on at the next line
                    row_number += 1
                    if "unexpected end of data" in str(exc):
                        out += self._unclosed(row_number, opened, start_row)
                        break
                    if row_number >= start_row:
                        out.append((row_number, {}, f"row {row_number}: not readable CSV: {exc}"))
                else:
                    row_number += 1
                    if row_number < start_row or not cells:
                        continue
                    out.append(self._csv_record(row_number, cells))
                if len(out) >= self.batch_rows:
                    yield out
                    out = []
        for begin in range(0, len(out), self.batch_rows):
            yield out[begin : begin + self.batch_rows]

    def _unclosed(self, row_number: int, opened: int, start_row: int) -> list[Record]:
        """A quote opened on line `opened` that never closes: its row, and each non-empty line
        after it, rejected as unread (never silently swallowed into one cell)."""
        why = f"a quote opened on line {opened} of the file never closes"
        out: list[Record] = [(row_number, {}, f"row {row_number}: {why}")]
        with self._open_csv() as handle:
            for line_number, line in enumerate(handle, start=1):
                if line_number > opened and line.strip():
                    row_number += 1
                    reason = f"row {row_number} (line {line_number}): unread: {why}"
                    out.append((row_number, {}, reason))
        return [r for r in out if r[0] >= start_row]

    def _csv_record(self, row_number: int, cells: list[str]) -> Record:
        if len(cells) != len(self.columns):
            reason = f"has {len(cells)} fields; the header has {len(self.columns)}"
            return row_number, {}, f"row {row_number}: {reason}"
        # a cell our own files neutralised for spreadsheets (`'=...`) reads as it was written
        record = dict(zip(self.columns, map(from_sheet, cells), strict=True))
        problems = []
        for column, cell in record.items():
            if len(cell) > CELL_LIMIT:
                problems.append(
                    f"column {column!r} holds {len(cell):,} characters; a cell holds at most "
                    f"{CELL_LIMIT:,}"
                )
                record[column] = ""
            elif bad := _undecodable(cell):
                problems.append(f"column {column!r}: {bad}")
                record[column] = _replace_undecodable(cell)
        if problems:
            return row_number, record, f"row {row_number}: " + "; ".join(problems)
        return row_number, record, None

    def batches(self, start_row: int = 1) -> Iterator[list[Item]]:
        """Checked rows in batches: small ones first, so the first creates need not wait for a
        whole batch to be read and journaled, then growing to `batch_rows`."""
        size = min(self.batch_rows, _FIRST_BATCH)
        for records in self.records(start_row):
            begin = 0
            while begin < len(records):
                chunk = records[begin : begin + size]
                begin += len(chunk)
                items = [self._item(*record) for record in chunk]
                yield items if self.inputs is None else self.inputs.apply(items)
                size = min(self.batch_rows, size * 4)

    def _item(self, row_number: int, record: dict[str, Any], problem: str | None) -> Item:
        problem = problem or record.get(PROBLEM) or None  # a shaped copy's unread row
        if problem is not None:
            return Rejected(f"row-{row_number}", row_number, record, problem)
        return self.mapper.map(row_number, record)


class _FillDown:
    """`manifest.fill_down`: a product's blank cells take its first row's values (the first
    row with the same `by` values); a cell that has a value keeps it."""

    def __init__(self, by: Iterable[str], columns: Iterable[str]) -> None:
        self._by = tuple(by)
        self._columns = tuple(columns)
        self._first: OrderedDict[tuple[str, ...], dict[str, Any]] = OrderedDict()

    def fill(self, record: Record) -> Record:
        number, values, problem = record
        if not values:
            return record
        key = tuple(str(values.get(c)).strip() for c in self._by)
        if any(is_blank(values.get(c)) for c in self._by):
            return record
        first = self._first.get(key)
        if first is None:
            self._first[key] = {c: values.get(c) for c in self._columns}
            if len(self._first) > _PRODUCTS_KEPT:
                self._first.popitem(last=False)
            return record
        self._first.move_to_end(key)
        blank = [c for c in self._columns if is_blank(values.get(c)) and not is_blank(first[c])]
        if not blank:
            return record
        return number, {**values, **{c: first[c] for c in blank}}, problem
