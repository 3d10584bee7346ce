"""An export as the platform wrote it, made into the table a run reads: one row per edit.

Three layouts are not read in place; each is copied once into the run folder (again with
`--force`), and the run, its resumes and its retries read the copy:

- an `.xlsx` workbook: its sheet (`manifest.sheet`, else the first) as CSV text, cells as Excel
  shows them, from `manifest.header_row`;
- a folder or a glob of Parquet files (a Spark or Hive output): its part files in name order,
  `_SUCCESS`, `.crc` and hidden files left out, partition columns (`country=de/`) kept;
- `manifest.images: each`: every image of the mapped image cell becomes its own row, with the
  row's other fields, id `<id>/<position>` (`wanbatch_id`), the image alone
  (`wanbatch_image_url`, which `img_url` then reads, and in the image cell itself, so that a
  failures manifest fed back sends that image, not the gallery), its position
  (`wanbatch_image`) and the export's row (`wanbatch_source_row`). A row the filters leave
  out, or without images, stays one row; a row that cannot be read keeps its reason
  (`wanbatch_problem`) and is rejected.
"""

from __future__ import annotations

import csv
import datetime
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import ManifestError, ManifestSection, is_blank
from pipeline.intake.manifest import PROBLEM, Manifest
from pipeline.intake.rowmap import cell, split_images

__all__ = ["EXTRA_COLUMNS", "PROBLEM", "SHAPED", "needs_shape", "shape_catalog"]

SHAPED = "manifest-shaped"  # the copy's name in the run folder, before its suffix
ID, IMAGE, POSITION, SOURCE_ROW = (
    "wanbatch_id",
    "wanbatch_image_url",
    "wanbatch_image",
    "wanbatch_source_row",
)
EXTRA_COLUMNS = (ID, IMAGE, POSITION, SOURCE_ROW, PROBLEM)


def _many(path: Path) -> bool:
    return path.is_dir() or glob.has_magic(str(path))


def needs_shape(section: ManifestSection) -> bool:
    return section.kind == "xlsx" or _many(section.path) or section.images == "each"


def shape_catalog(
    m: ManifestSection, folder: Path, *, again: bool, model: str, allow_loopback: bool
) -> ManifestSection:
    """The manifest section reading the shaped copy in `folder` (made unless there and not
    `again`), or the section as it is when its manifest is read in place."""
    if not needs_shape(m):
        return m
    given = m.given or m.path
    section = m
    if m.kind == "xlsx":
        section = _from_sheet(m, folder / f"{SHAPED}-sheet.csv", again)
    elif _many(m.path):
        section = _from_parts(m, folder / f"{SHAPED}-parts.parquet", again)
    if m.images == "each":
        section = _each(section, folder, again, model, allow_loopback)
    return section.model_copy(update={"given": given})


def _ready(path: Path, again: bool) -> bool:
    return path.is_file() and not again


def _write_atomic(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _shown_cell(value: Any) -> str:
    """A spreadsheet cell as Excel shows it in a CSV it saves: 12 for 12.0, dates in ISO."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def _from_sheet(m: ManifestSection, out: Path, again: bool) -> ManifestSection:
    """An .xlsx sheet as a UTF-8 CSV copy, its header on line 1."""
    done = m.model_copy(
        update={
            "path": out,
            "format": "csv",
            "header_row": None,
            "sheet": None,
            "encoding": "utf-8",
            "delimiter": None,
        }
    )
    if _ready(out, again):
        return done
    from openpyxl import load_workbook  # only a spreadsheet manifest loads it
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = load_workbook(m.path, read_only=True, data_only=True)
    except FileNotFoundError:
        raise ManifestError(f"manifest {m.path} does not exist") from None
    except (InvalidFileException, OSError, KeyError, ValueError) as exc:
        raise ManifestError(f"manifest {m.path} is not a readable .xlsx workbook: {exc}") from None
    try:
        if m.sheet is not None and m.sheet not in book.sheetnames:
            raise ManifestError(
                f"manifest {m.path} has no sheet {m.sheet!r} (sheets: {', '.join(book.sheetnames)})"
            )
        sheet = book[m.sheet] if m.sheet is not None else book.worksheets[0]
        tmp = _write_atomic(out)
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            width = 0
            for line, values in enumerate(sheet.iter_rows(values_only=True), start=1):
                if line < (m.header_row or 1):
                    continue
                cells = [_shown_cell(v) for v in values]
                if line == (m.header_row or 1):
                    while cells and not cells[-1].strip():
                        cells.pop()  # a sheet's used range runs past its last named column
                    width = len(cells)
                    writer.writerow(cells)
                    continue
                cells = cells[:width] + [""] * (width - len(cells))
                if any(c.strip() for c in cells):  # a blank line of the sheet is no row
                    writer.writerow(cells)
        os.replace(tmp, out)
    finally:
        book.close()
    return done


def _part_files(path: Path) -> tuple[list[str], str | None]:
    """The Parquet files of a folder or glob in name order, without Spark's markers and
    checksums or hidden files; the folder partitions are read from."""
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file()]
        base: str | None = str(path)
    else:
        found = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        base = None
    root = path if path.is_dir() else Path(glob.escape(str(path))).parent
    kept = [
        str(p)
        for p in found
        if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
        and not p.name.endswith(".crc")
    ]
    return sorted(kept), base


def _from_parts(m: ManifestSection, out: Path, again: bool) -> ManifestSection:
    """A folder or glob of Parquet part files as one Parquet copy, partition columns kept."""
    done = m.model_copy(update={"path": out, "format": "parquet"})
    if _ready(out, again):
        return done
    files, base = _part_files(m.path)
    if not files:
        raise ManifestError(f"manifest {m.path} holds no Parquet part file")
    import pyarrow.dataset as ds  # loaded for part files only: it brings pandas, ~50 MB

    try:
        parts = ds.dataset(
            files,
            format="parquet",
            partitioning=ds.partitioning(flavor="hive") if base else None,
            partition_base_dir=base,
        )
        tmp = _write_atomic(out)
        with pq.ParquetWriter(tmp, parts.schema) as writer:
            for batch in parts.to_batches(batch_size=m.batch_rows):
                writer.write_batch(batch)
        os.replace(tmp, out)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"manifest {m.path} cannot be read as Parquet parts: {exc}") from None
    return done


def _each(
    m: ManifestSection, folder: Path, again: bool, model: str, allow_loopback: bool
) -> ManifestSection:
    """`images: each`: the table with a row per image of the mapped image cell."""
    parquet = m.kind == "parquet"
    out = folder / f"{SHAPED}.{'parquet' if parquet else 'csv'}"
    columns = {**m.columns, "img_url": IMAGE}
    done = m.model_copy(
        update={
            "path": out,
            "format": "parquet" if parquet else "csv",
            "images": "references",
            "id_column": ID,
            "columns": columns,
            "header_row": None,
            "encoding": "utf-8",
            "delimiter": None,
        }
    )
    if _ready(out, again):
        return done
    source = Manifest(
        m.model_copy(update={"images": "references"}),
        model=model,
        allow_loopback=allow_loopback,
    )
    tmp = _write_atomic(out)
    rows = _expanded(source)
    if parquet:
        _write_parquet(tmp, pq.read_schema(m.path), rows)
    else:
        _write_csv(tmp, source.columns, rows)
    os.replace(tmp, out)
    return done


def _expanded(source: Manifest) -> Iterator[list[dict[str, Any]]]:
    """Batches of the shaped rows: each image of a row that is read and kept, on its own."""
    mapper = source.mapper
    column = mapper.columns.get("img_url")

    for batch in source.records():
        out: list[dict[str, Any]] = []
        for number, record, problem in batch:
            base = {**record, SOURCE_ROW: number}
            if problem is not None:
                out.append({**base, ID: f"row-{number}", PROBLEM: problem})
                continue
            job_id = mapper.job_id(number, record)
            value = cell(record, column) if column is not None else None
            images, rule = split_images(value) if not is_blank(value) else ([], None)
            kept = mapper.where is None or mapper.where.keeps(record)
            if rule is not None or not images or not kept:
                text = value if isinstance(value, str) and kept else None
                out.append(
                    {
                        **base,
                        ID: job_id,
                        IMAGE: text if rule is None else None,
                        PROBLEM: f"row {number}: img_url (column {column!r}): {rule}"
                        if rule
                        else None,
                    }
                )
                continue
            for position, image in enumerate(images, start=1):
                row = {**base, ID: f"{job_id}/{position}", IMAGE: image, POSITION: position}
                if column in record:  # the image cell holds this image alone: a failures
                    # manifest fed back sends this image again, not the whole gallery
                    row[column] = [image] if isinstance(value, list | tuple) else image
                out.append(row)
        yield out


def _write_csv(path: Path, columns: list[str], rows: Iterator[list[dict[str, Any]]]) -> None:
    names = [*columns, *EXTRA_COLUMNS]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for batch in rows:
            for row in batch:
                writer.writerow(["" if row.get(n) is None else row[n] for n in names])


def _write_parquet(path: Path, schema: pa.Schema, rows: Iterator[list[dict[str, Any]]]) -> None:
    extra = [
        pa.field(ID, pa.string()),
        pa.field(IMAGE, pa.string()),
        pa.field(POSITION, pa.int64()),
        pa.field(SOURCE_ROW, pa.int64()),
        pa.field(PROBLEM, pa.string()),
    ]
    shaped = pa.schema([*schema, *extra])
    with pq.ParquetWriter(path, shaped) as writer:
        for batch in rows:
            writer.write_table(pa.Table.from_pylist(batch, schema=shaped))
