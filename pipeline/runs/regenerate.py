"""`checks.regenerate: N`: an edit that fails an automatic check is made again with a new seed,
up to N times a row, within the budget. Each failed edit goes into its row's history as a
person's rejection does (its cost still counted, its images kept, `rejected_by: checks` and the
rules it failed), and the row is sent again; the first edit that passes is kept. Decided from
the journal alone, so a crash between rounds loses nothing: the next run takes up the rows
where they stand.
"""

from __future__ import annotations

from dataclasses import replace

import structlog

from pipeline.core import RunConfig, Status
from pipeline.intake import Manifest
from pipeline.journal import Journal, Redo, StateStore
from pipeline.runs.review import remake

__all__ = ["regenerate"]

_log = structlog.get_logger("pipeline.runs.regenerate")
_NOTE = "made again: the edit failed the automatic checks"


def regenerate(
    config: RunConfig,
    journal: Journal,
    state: StateStore | None,
    manifest: Manifest,
    room_usd: float | None,
    first: bool = True,
) -> int:
    """Put back the rows whose edit failed a check and may be made again, as many as
    `room_usd` (what the budget has left; None: no budget) pays for at the configured price,
    so a row is never left without an edit for want of money; how many rows. The rows that
    cannot be (a fixed seed and prompt, or no budget left) are said on the `first` round
    only."""
    most = config.checks.regenerate
    rows = journal.checks.to_regenerate(most) if most else []
    if not rows:
        return 0
    targets = journal.reviews.review_targets(rows)
    edits = {t.prediction_id for t in targets.values() if t.prediction_id}
    shared = journal.reviews.sharing(edits)
    targets.update(journal.reviews.review_targets([r for rs in shared.values() for r in rs]))
    redo: list[Redo] = []
    same = short = 0
    judged: set[str] = set()
    price = config.api.price_per_image_usd
    for row in rows:
        lead = targets[row]
        if lead.status is not Status.SUCCEEDED or lead.prediction_id in judged:
            continue
        judged.add(lead.prediction_id or "")
        cost = price * int(lead.inputs.get("n", 1) or 1)
        if room_usd is not None and cost > room_usd + 1e-9:
            short += 1  # the failing edit is kept, flagged: the budget pays for no remake
            continue
        made = remake(config, manifest, lead, _NOTE)
        if made is None:
            same += 1  # a fixed seed and prompt would buy the same image again
            continue
        made = replace(made, by="checks")
        if room_usd is not None:
            room_usd -= cost
        followers = shared.get(lead.prediction_id or "", [row])
        redo.append(made)
        redo += [replace(made, row_number=r, follows=row) for r in followers if r != row]
    journal.reviews.record_review([], redo)
    if state is not None:  # no later night carries a failed edit over
        failed = [targets[r.row_number] for r in redo if r.follows is None]
        state.forget(
            [(t.fingerprint, t.prediction_id) for t in failed if t.fingerprint and t.prediction_id]
        )
    if same and first:
        _log.warning(
            "not_regenerated",
            rows=same,
            said=f"{same:,} edit(s) failed a check but were not made again: their input fixes "
            "the seed and the prompt, and would make the same image",
        )
    if short and first:
        _log.warning(
            "regenerate_budget",
            rows=short,
            said=f"{short:,} edit(s) failed a check and were kept as they are: budget.max_cost_usd "
            "leaves no room to make them again",
        )
    _log.info("regenerating", rows=len(redo))
    return len(redo)
