"""Which run a folder holds, and the manifest it keeps: a run folder is bound to one config
and one manifest (checked before anything is sent), and keeps its own copy of a local manifest
so that a resume or a retry reads what the run started with."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import structlog

from pipeline.core import (
    JOURNAL,
    KEPT_MANIFEST,
    ManifestError,
    RunConfig,
    RunFolderMismatch,
    copy_object,
    file_sha256,
)
from pipeline.intake import shape_catalog
from pipeline.journal import Journal
from pipeline.runs.folder import RunFolder

_log = structlog.get_logger("pipeline.runs.runner")


def identity(config: RunConfig) -> dict[str, str]:
    """What must not change between a run and its resume: the model and the row mapping,
    and the manifest file itself."""
    stat = config.manifest.path.stat()
    return {
        "mapping": mapping_of(config),
        "manifest_file": f"{stat.st_size}:{file_digest(config.manifest.path)}",
    }


def mapping_of(config: RunConfig) -> str:
    """The model and the row mapping, as a short hash."""
    m = config.manifest
    mapping = json.dumps(
        {
            "model": config.api.model,
            "path": str(m.given or m.path),
            "id": m.id_column,
            "columns": m.columns,
            "defaults": m.defaults,
            # set only when given, so a run folder made before these existed is still its own
            **{
                k: v
                for k, v in {
                    "where": m.where,
                    "images": None if m.images == "references" else m.images,
                    "fill_down": m.fill_down.model_dump() if m.fill_down else None,
                    "url_base": m.url_base,
                    "header_row": m.header_row,
                }.items()
                if v is not None
            },
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(mapping.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


def check_identity(
    journal: Journal, config: RunConfig, force: bool, *, remap: bool = False
) -> dict[str, str] | None:
    """The run's identity when `--force` must take the manifest as it is now (it or the
    mapping changed), to be journaled once that is done; None when nothing changed.
    `remap` (`retry --rejected`): a changed mapping is let through, and journaled by the
    review once its decisions are recorded (the rejected rows are sent with it; the rows
    journaled before keep the input they were given)."""
    current = identity(config)
    known = {name: journal.get_meta(name) for name in current}
    if all(value is None for value in known.values()):
        journal.set_meta(current)
        return None
    changed = [name for name, value in current.items() if known[name] != value]
    if changed == ["mapping"] and remap:
        return None
    if changed and force:
        return current
    if changed:
        what = {
            "mapping": "model or manifest mapping in the config",
            "manifest_file": "manifest file",
        }
        raise RunFolderMismatch(
            f"run folder {config.output.dir} holds a run of another "
            + " and of another ".join(what[c] for c in changed)
            + "; resuming would mix results. Pass --force to continue with the manifest as it "
            "is now (finished rows are kept, unsent rows take their new inputs), `wanbatch run "
            "CONFIG --fresh` to start over (every row is paid again), or use a new output.dir."
        )
    return None


def keep_manifest(config: RunConfig, run_dir: Path, force: bool) -> RunConfig:
    """A local manifest is copied into the run folder when the run starts (and again with
    --force), and the run reads the copy: a resume or a retry reads what the run started with,
    even after tonight's export replaced the file. An object URL's copy is made by
    `copy_manifest`; a manifest given from Python is in the run folder already."""
    m = config.manifest
    if m.source is not None or m.path.parent == run_dir:
        return config
    kept = run_dir / f"{KEPT_MANIFEST}{m.path.suffix}"
    started = (run_dir / JOURNAL).exists()
    if m.path.is_file() and (force or not started or not kept.is_file()):
        tmp = kept.with_name(f".{kept.name}.tmp")
        try:
            shutil.copyfile(m.path, tmp)
            os.replace(tmp, kept)
        except OSError as exc:
            raise ManifestError(
                f"manifest {m.path} cannot be copied into {run_dir}: {exc}"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    if not kept.is_file():
        return config  # nothing to read: the manifest's own check says so
    if started and not force and m.path.is_file() and changed(m.path, kept):
        _log.warning(
            "manifest_changed",
            path=str(m.path),
            hint="this run goes on with the manifest it started with; --force takes the file "
            "as it is now, --fresh starts over",
        )
    section = m.model_copy(update={"path": kept, "given": m.path, "format": m.kind})
    return config.model_copy(update={"manifest": section})


def shaped(config: RunConfig, folder: RunFolder, force: bool) -> RunConfig:
    """The config reading the run folder's shaped copy of an export (a workbook, Parquet
    parts, a row per image: see `intake.shape`), made when the run starts and with --force; a
    resume reads the copy it started with."""
    again = force or not (folder.path / JOURNAL).exists()
    section = shape_catalog(
        config.manifest,
        folder.path,
        again=again,
        model=config.api.model,
        allow_loopback=config.allow_loopback_urls,
    )
    return config.model_copy(update={"manifest": section})


def changed(path: Path, kept: Path) -> bool:
    return path.stat().st_size != kept.stat().st_size or file_digest(path) != file_digest(kept)


def copy_manifest(config: RunConfig, folder: RunFolder, force: bool) -> None:
    """A manifest given as an object URL is copied into the run folder when a run starts
    (and with --force, to take it as it is now); a resume reads the copy it started with."""
    m = config.manifest
    assert m.source is not None
    if m.path.exists() and not force and (folder.path / JOURNAL).exists():
        return
    try:
        copy_object(m.source, m.path, config.assets.storage_options)
    except FileNotFoundError:
        raise ManifestError(f"manifest {m.source} does not exist") from None
    except OSError as exc:
        raise ManifestError(f"manifest {m.source} cannot be read: {exc}") from None
    _log.info("manifest_copied", source=m.source, bytes=m.path.stat().st_size)
