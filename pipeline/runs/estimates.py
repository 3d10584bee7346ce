"""`wanbatch estimate CONFIG` (and `run --dry-run`) put together: the manifest read as a run
would read it (its copy from a bucket, its shaped copy), its inputs judged but not uploaded,
its rows counted (`intake.estimating`), and the sends planned with the run's own numbers
(`core.plan`). Nothing is created or uploaded, and nothing is written in the run folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.core import ManifestError, RunConfig, copy_object, plan_run
from pipeline.intake import Estimate, Manifest, count_rows, plan_sends, shape_catalog
from pipeline.journal import StateStore

__all__ = ["estimate"]


def estimate(config: RunConfig, keys: int) -> Estimate:
    """Read the whole manifest as a run would; nothing is created or uploaded (a manifest in
    a bucket is read from a temporary copy, not the run folder's)."""
    with tempfile.TemporaryDirectory(prefix="wanbatch-estimate-") as tmp:
        folder = Path(tmp)
        section = config.manifest
        if section.source is not None:
            copy = folder / section.path.name
            try:
                copy_object(section.source, copy, config.assets.storage_options)
            except OSError as exc:  # FileNotFoundError included
                raise ManifestError(f"manifest {section.source} cannot be read: {exc}") from None
            section = section.model_copy(update={"path": copy})
        model, loopback = config.api.model, config.allow_loopback_urls
        section = shape_catalog(section, folder, again=True, model=model, allow_loopback=loopback)
        manifest = Manifest(section, model=model, allow_loopback=loopback)
        manifest.judge_inputs(config.assets, dry=True)
        inc = config.incremental
        state = StateStore(inc.state) if inc.enabled and inc.state is not None else None
        try:
            found = count_rows(
                manifest,
                state,
                folder,
                price=config.api.price_per_image_usd,
                dedupe=section.dedupe,
            )
            learned = state.latencies(1000) if state is not None else []
        finally:
            if manifest.inputs is not None:
                manifest.inputs.close()
            if state is not None:
                state.close()
    plan_sends(
        found,
        learned,
        plan_run(config),
        keys=keys,
        limits=config.limits,
        expected_latency_s=config.polling.expected_latency_s,
    )
    return found
