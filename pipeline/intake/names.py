"""The names a config gives, checked against the catalog's header before anything is read:
every column it names is there (a struct's field and a list's element by path), names given
with spaces around them match, `manifest.where` compiles, the required fields are given."""

from __future__ import annotations

from pathlib import Path

import structlog

from pipeline.core import ManifestError, ManifestSection
from pipeline.intake.rowmap import PromptTemplate, path_root
from pipeline.intake.rowmap import cell as read_cell
from pipeline.intake.where import Filter, WhereError, compile_where

__all__ = ["check_names", "compile_filter", "has", "trimmed_names"]

_log = structlog.get_logger("pipeline.intake.manifest")


def trimmed_names(section: ManifestSection, columns: list[str], shown: Path) -> ManifestSection:
    """Column names given with spaces around them (` Image Src`) name the column without
    them, as the header's own names are read; a note says so."""
    changed: list[str] = []

    def trim(name: str) -> str:
        if name != name.strip() and name not in columns:
            changed.append(name)
            return name.strip()
        return name

    fill = section.fill_down
    update: dict[str, object] = {
        "columns": {f: trim(c) for f, c in section.columns.items()},
        "id_column": [trim(c) for c in section.id_columns] or None,
    }
    if isinstance(section.id_column, str):
        update["id_column"] = trim(section.id_column)
    if fill is not None:
        update["fill_down"] = fill.model_copy(
            update={
                "by": [trim(c) for c in fill.by_columns],
                "columns": [trim(c) for c in fill.columns],
            }
        )
    trimmed = section.model_copy(update=update)
    if changed:
        _log.warning(
            "column_names_trimmed",
            manifest=str(shown),
            names=changed,
            note="column names match ignoring the spaces around them",
        )
    return trimmed


def compile_filter(text: str | None, columns: list[str], shown: Path) -> Filter | None:
    if text is None:
        return None
    try:
        found = compile_where(text, read_cell)
    except WhereError as exc:
        raise ManifestError(f"manifest.where cannot be read {exc}: {text}") from None
    for column in found.columns:
        if not has(columns, column):
            raise ManifestError(
                f"manifest.where names column {column!r}, which manifest {shown} "
                f"does not have (columns: {', '.join(columns)}); a name with spaces "
                "goes in backticks"
            )
    return found


def has(columns: list[str], column: str) -> bool:
    """A column of the file, or a path into one (`media.hero`, `media.gallery[0]`)."""
    return column in columns or (path_root(column) != column and path_root(column) in columns)


def check_names(
    section: ManifestSection,
    mapping: dict[str, str],
    template: PromptTemplate | None,
    columns: list[str],
    shown: Path,
) -> None:
    """Every column the config names is in the file; the required fields are given."""
    have = f"(columns: {', '.join(columns)})"
    fill = section.fill_down
    for what, names in (
        ("fill_down.by", fill.by_columns if fill else ()),
        ("fill_down.columns", fill.columns if fill else ()),
    ):
        for column in names:
            if column not in columns:
                raise ManifestError(
                    f"manifest {shown}: {what} names {column!r}, which is not a column {have}"
                )
    for column in section.id_columns:
        if not has(columns, column):
            raise ManifestError(f"manifest {shown}: id_column {column!r} is not a column {have}")
    for field, column in section.columns.items():
        if not has(columns, column):
            raise ManifestError(
                f"manifest {shown}: columns.{field} names column {column!r}, which the "
                f"manifest does not have {have}"
            )
    for column in template.columns if template is not None else ():
        if not has(columns, column):
            raise ManifestError(
                f"manifest {shown}: prompt_template names {{{column}}}, which is not a "
                f"column {have}"
            )
    given = set(mapping) | set(section.defaults) | ({"prompt"} if template else set())
    for field in ("prompt", "img_url"):
        if field not in given:
            raise ManifestError(
                f"manifest {shown}: no column gives the required field {field!r}; "
                f"map one under manifest.columns.{field}"
                + (" or write manifest.prompt_template" if field == "prompt" else "")
            )
    for field in section.skip_if_blank:
        if field not in mapping:
            raise ManifestError(
                f"manifest {shown}: skip_if_blank names {field!r}, which no column gives"
            )
