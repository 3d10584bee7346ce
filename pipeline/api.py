"""The Python entry point, for orchestrators (an Airflow or Dagster task) that call wanbatch
without a shell: `pipeline.run(config)` runs or resumes a config and returns its RunSummary,
or raises the typed error of the CLI's exit code. It installs no signal handlers unless asked.

    summary = pipeline.run("nightly.yaml", overrides=["output.dir=runs/2026-11-25"])
    summary.exit_code, summary.counts, summary.totals["cost_usd"], summary.results()

The manifest may be a pandas DataFrame or a pyarrow Table (`manifest=df`): the config then
needs no `manifest.path`, and the run folder keeps it as `manifest.parquet`; passing the same
table again resumes the run, another one is refused as a mismatch (or taken with `force`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import (
    ApiKey,
    ManifestError,
    RowsFailed,
    RunConfig,
    apply_overrides,
    ended_by,
    keys_from_env,
    load_config,
    parse_config,
)
from pipeline.drive import Workers
from pipeline.observe import Reporter
from pipeline.outputs import RunSummary
from pipeline.runs import OpenSandbox, Reprocess, RunFolder, logging_to
from pipeline.runs import run as run_async

__all__ = ["arun", "load", "run"]

TABLE_MANIFEST = "manifest.parquet"  # a manifest given from Python, kept in the run folder


def load(
    config: RunConfig | Mapping[str, Any] | str | Path,
    *,
    overrides: Sequence[str] = (),
    run_date: datetime.date | None = None,
    table: bool = False,
) -> RunConfig:
    """A config from a path (or object URL), a mapping (relative paths from the working
    folder) or a loaded RunConfig (overrides do not apply to that). `table`: the manifest is
    given from Python, kept in the run folder (see TABLE_MANIFEST)."""
    if table:  # a stand-in, so a config without manifest.path validates
        overrides = [*overrides, f"manifest.path={TABLE_MANIFEST}"]
    if isinstance(config, RunConfig):
        loaded = config
    elif isinstance(config, Mapping):
        data = apply_overrides(dict(config), overrides)
        loaded = parse_config(data, Path.cwd(), "<mapping>", run_date=run_date)
    else:
        loaded = load_config(config, sets=overrides, run_date=run_date)
    if not table:
        return loaded
    kept = loaded.manifest.model_copy(
        update={"path": loaded.output.dir / TABLE_MANIFEST, "format": "parquet", "source": None}
    )
    return loaded.model_copy(update={"manifest": kept})


def _keep_table(manifest: Any, path: Path) -> None:
    """A DataFrame or Arrow Table written as the run folder's Parquet manifest (whole, or
    not at all); its column types are kept, nullable integers included."""
    if isinstance(manifest, pa.Table):
        table = manifest
    else:
        import pandas as pd  # only a run given a DataFrame loads pandas

        if not isinstance(manifest, pd.DataFrame):
            raise ManifestError(
                "manifest= takes a pandas DataFrame or a pyarrow Table, not "
                f"{type(manifest).__name__}"
            )
        names = [str(c) for c in manifest.columns]
        if len(set(names)) != len(names):
            raise ManifestError(f"the manifest DataFrame has a repeated column name: {names}")
        try:
            table = pa.Table.from_pandas(manifest, preserve_index=False)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ManifestError(
                f"the manifest DataFrame cannot be kept as Parquet: {exc}"
            ) from None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


async def arun(
    config: RunConfig | Mapping[str, Any] | str | Path,
    *,
    keys: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    run_date: datetime.date | None = None,
    fresh: bool = False,
    force: bool = False,
    retry_errors: Sequence[str] | None = None,
    rejected: str | Path | None = None,
    handle_signals: bool = False,
    raise_on_failed_rows: bool = True,
    reporter: Reporter | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    manifest: Any = None,
) -> RunSummary:
    """`run`, in a running event loop."""
    loaded = load(config, overrides=overrides, run_date=run_date, table=manifest is not None)
    api_keys = [ApiKey(k) for k in keys] if keys is not None else keys_from_env()
    reprocess = None
    if retry_errors is not None or rejected is not None:
        chosen = (retry_errors or None) if retry_errors is not None else ()
        reprocess = Reprocess(chosen, decisions=Path(rejected) if rejected else None)
    with RunFolder(loaded.output.dir, fresh=fresh) as folder, logging_to(folder.log_path):
        if manifest is not None:
            await anyio.to_thread.run_sync(_keep_table, manifest, loaded.manifest.path)
        summary = await run_async(
            loaded,
            api_keys,
            force=force,
            handle_signals=handle_signals,
            reprocess=reprocess,
            folder=folder,
            reporter=reporter,
            workers=Workers(workers, ray_address) if workers is not None else None,
            embedded=_embedded(loaded),
        )
    raises = ended_by(summary.exit_code)
    if raises is RowsFailed and not raise_on_failed_rows:
        return summary
    if raises is not None:
        raise raises(summary.message, summary)
    return summary


def _embedded(config: RunConfig) -> OpenSandbox | None:
    """The embedded sandbox's opener when the config asks for it (loaded only then)."""
    if not config.embedded_sandbox:
        return None
    from pipeline.sandbox.embedded import open_embedded

    return open_embedded


def run(
    config: RunConfig | Mapping[str, Any] | str | Path,
    *,
    keys: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    run_date: datetime.date | None = None,
    fresh: bool = False,
    force: bool = False,
    retry_errors: Sequence[str] | None = None,
    rejected: str | Path | None = None,
    handle_signals: bool = False,
    raise_on_failed_rows: bool = True,
    reporter: Reporter | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    manifest: Any = None,
) -> RunSummary:
    """Run (or resume) a config and return its summary; keys from the environment unless
    given. Raises ConfigError, ManifestError or RunFolderError before anything is sent, and a
    RunEnded subclass (carrying `.summary`) for a run that ended short of success, as the CLI's
    exit codes do; `raise_on_failed_rows=False` returns the summary of a run that finished
    with failed or rejected rows instead. `retry_errors` runs failed rows of those error
    types again (`[]`: every failure), as `wanbatch retry` does; `rejected`: a decisions file
    from the report's review, as `wanbatch retry --rejected` takes it. `workers`: spread the keys
    over that many Ray workers (on `ray_address`, RAY_ADDRESS, or a local cluster), as
    `--workers` does. `manifest`: a pandas DataFrame or pyarrow Table to run instead of
    the config's manifest.path (see the module's docstring)."""
    return anyio.run(
        lambda: arun(
            config,
            keys=keys,
            overrides=overrides,
            run_date=run_date,
            fresh=fresh,
            force=force,
            retry_errors=retry_errors,
            rejected=rejected,
            handle_signals=handle_signals,
            raise_on_failed_rows=raise_on_failed_rows,
            reporter=reporter,
            workers=workers,
            ray_address=ray_address,
            manifest=manifest,
        )
    )
