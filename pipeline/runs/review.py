"""`wanbatch retry RUN_DIR --rejected decisions.csv`: a reviewer's decisions into the run.

Each decision is checked against the row it names before anything is sent: a row the run does
not have, or one that is another product here, refuses the file (a decisions file of another
run). A decision made on an edit the row no longer has (it was made again since) no longer
applies and is left out, said once. Approvals are recorded (`review` in the results, and
`approved.csv`); each rejected edit goes into its row's history and the row is sent again with
the config's input as it is now (`--set` may change the prompt) and a new seed, unless the
config fixes one. A rejected edit whose new input would be the rejected one (a fixed seed,
an unchanged prompt) is not sent: it would buy the same image again; the decision is left out,
said with the way out. An approved edit is never sent again; its rejected edit is forgotten
by the incremental state, so no later night carries it over.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from pipeline.core import (
    IMAGE_FIELDS,
    INPUT_FIELDS,
    SEED_RANGE,
    ConfigError,
    Decision,
    JobSpec,
    RunConfig,
    Status,
    fingerprint,
)
from pipeline.intake import Manifest, read_decisions, refused
from pipeline.journal import Journal, Redo, ReviewTarget, StateStore
from pipeline.runs.identity import mapping_of

__all__ = ["Reviewed", "apply_decisions", "approve_passing", "remake"]

_log = structlog.get_logger("pipeline.runs.review")
_SHOWN = 10
_SAME_INPUT = (
    "its input as the config maps it now is the one rejected, seed included, and would make "
    "the same image again at a price: change the prompt (--set manifest.prompt_template=... "
    "or the prompt column), or let a new seed be drawn (no manifest.defaults.seed or seed "
    "column)"
)


@dataclass
class Reviewed:
    """What a decisions file did: rows approved, rows sent again, and decisions left out
    (by line) with the reason."""

    approved: int = 0
    redone: int = 0
    left_out: dict[str, list[int]] = field(default_factory=dict)

    def leave_out(self, why: str, decision: Decision) -> None:
        self.left_out.setdefault(why, []).append(decision.line)


def apply_decisions(
    config: RunConfig,
    journal: Journal,
    state: StateStore | None,
    manifest: Manifest,
    path: Path,
) -> Reviewed:
    """Read the decisions file and check every decision against its row, then record them in
    one transaction (approvals, and each rejected edit put back with its new input) and the
    config's mapping as the run's. ConfigError, with nothing recorded, when the file breaks a
    rule or names rows this run does not have, or has as other products."""
    done = Reviewed()
    decisions = _by_id(journal, state, read_decisions(path), done)
    targets = journal.reviews.review_targets([d.row_number for d in decisions])
    problems = [p for d in decisions if (p := _mismatch(d, targets.get(d.row_number)))]
    if problems:
        then = "; nothing was recorded or sent: give the decisions exported from this run's report"
        raise refused(path, problems, then)
    shared = _shared_edits(journal, decisions, targets)
    if contradictions := _contradictions(decisions, targets):
        then = "; nothing was recorded or sent: a shared edit is approved or rejected as one"
        raise refused(path, contradictions, then)
    targets.update(journal.reviews.review_targets([r for rows in shared.values() for r in rows]))
    approved: list[tuple[int, str]] = []
    redo: list[Redo] = []
    forget: list[tuple[str, str]] = []
    judged: set[str] = set()  # edits decided (by prediction id): each once
    for decision in decisions:
        target = targets[decision.row_number]
        why = _left_out(decision, target, targets, shared)
        if why is not None:
            done.leave_out(why, decision)
            continue
        edit = target.prediction_id or ""
        if edit in judged:
            continue  # another row of the same edit, judged alike: done with it
        judged.add(edit)
        rows = shared.get(edit, [target.row_number])
        if decision.decision == "approved":
            approved += [(row, decision.note) for row in rows]
            continue
        lead = targets[rows[0]]
        made = remake(config, manifest, lead, decision.note)
        if made is None:
            done.leave_out(_SAME_INPUT, decision)  # the same input makes the same image
            continue
        redo.append(made)  # made once, for the edit's first row; the others share it
        redo += [replace(made, row_number=row, follows=lead.row_number) for row in rows[1:]]
        if lead.fingerprint and lead.prediction_id:
            forget.append((lead.fingerprint, lead.prediction_id))
    journal.reviews.record_review(approved, redo)
    journal.set_meta({"mapping": mapping_of(config)})  # the one the rejected rows are sent with
    if state is not None:
        _remember(state, forget, [(targets[row], note) for row, note in approved])
    done.approved, done.redone = len(approved), len(redo)
    _tell(path, done)
    return done


def _remember(
    state: StateStore,
    forget: list[tuple[str, str]],
    approved: list[tuple[ReviewTarget, str]],
) -> None:
    """The state store forgets the rejected edits, and keeps the approvals beside theirs: a
    later night that reuses an approved edit has it approved."""
    if forget:
        state.forget(forget)
    state.approve((t.prediction_id, note or None) for t, note in approved if t.prediction_id)


def _by_id(
    journal: Journal, state: StateStore | None, decisions: list[Decision], done: Reviewed
) -> list[Decision]:
    """Decisions that name a job id are of the row that has it in this run, wherever the
    rows moved since the file was exported (last night's file applies tonight). One whose
    id the run lacks is left out when an earlier night's catalog had it (the product was
    removed since: removed.csv), and else keeps its row, to be refused as not of this run."""
    ids = [d.job_id for d in decisions if d.job_id is not None]
    rows = journal.reviews.rows_of(ids)
    gone = state.known_products([i for i in ids if i not in rows]) if state else set()
    kept = []
    for d in decisions:
        if d.job_id is not None and d.job_id in rows:
            kept.append(replace(d, row_number=rows[d.job_id]))
        elif d.job_id in gone:
            done.leave_out("the product is no longer in the catalog (see removed.csv)", d)
        else:
            kept.append(d)
    return kept


def remake(config: RunConfig, manifest: Manifest, target: ReviewTarget, note: str) -> Redo | None:
    """The rejected edit's remake, or None when its input would be the rejected one."""
    inputs, drawn = _new_input(config, manifest, target)
    model = config.api.model
    if fingerprint(model, inputs) == fingerprint(model, target.inputs):
        return None
    # what the catalog asks for, as every row's fingerprint is: a seed drawn for the remake
    # is not part of it, so the next night carries the remake over
    asked = {f: v for f, v in inputs.items() if not (drawn and f == "seed")}
    return Redo(target.row_number, note, inputs, fingerprint(model, asked))


def _shared_edits(
    journal: Journal, decisions: list[Decision], targets: dict[int, ReviewTarget]
) -> dict[str, list[int]]:
    """The rows of each edit the decisions judge (prediction id -> rows, in row order)."""
    edits = {
        t.prediction_id
        for d in decisions
        if (t := targets.get(d.row_number)) is not None
        and t.prediction_id is not None
        and t.status is Status.SUCCEEDED
    }
    return journal.reviews.sharing(edits)


def _contradictions(decisions: list[Decision], targets: dict[int, ReviewTarget]) -> list[str]:
    """Lines that judge one shared edit differently, named."""
    by_edit: dict[str, list[Decision]] = {}
    for decision in decisions:
        target = targets[decision.row_number]
        if target.prediction_id is not None and decision.prediction_id in (
            None,
            target.prediction_id,
        ):
            by_edit.setdefault(target.prediction_id, []).append(decision)
    said = []
    for edit, judged in by_edit.items():
        if len({d.decision for d in judged}) > 1:
            lines = ", ".join(f"line {d.line} ({d.decision}, row {d.row_number})" for d in judged)
            said.append(f"{lines} judge one edit ({edit}) differently; the rows share it")
    return said


def _mismatch(decision: Decision, target: ReviewTarget | None) -> str | None:
    """Why a decision cannot be of this run, or None."""
    if target is None and not decision.row_number:
        return f"line {decision.line}, field job_id: {decision.job_id!r} is not in this run"
    if target is None:
        return f"line {decision.line}, field row: row {decision.row_number} is not in this run"
    if decision.job_id is not None and decision.job_id != target.job_id:
        return (
            f"line {decision.line}, field job_id: row {decision.row_number} is "
            f"{target.job_id!r} in this run, not {decision.job_id!r}"
        )
    return None


def _left_out(
    decision: Decision,
    target: ReviewTarget,
    targets: dict[int, ReviewTarget],
    shared: dict[str, list[int]],
) -> str | None:
    """Why a decision no longer applies to its row's edit, or None when it does."""
    if decision.prediction_id is not None and decision.prediction_id != target.prediction_id:
        return "the row's edit was made again since it was judged"
    if target.status is not Status.SUCCEEDED:
        return "the row has no edit to judge (it did not succeed)"
    rows = shared.get(target.prediction_id or "", [target.row_number])
    if decision.decision == "rejected" and any(targets[r].review == "approved" for r in rows):
        return "the row's edit was approved before, and an approved edit is never sent again"
    if decision.prediction_id is None and target.redone and decision.decision == "rejected":
        return (
            "the row's edit was already made again after a rejection (give prediction_id to "
            "judge the new one)"
        )
    return None


def _new_input(
    config: RunConfig, manifest: Manifest, target: ReviewTarget
) -> tuple[dict[str, Any], bool]:
    """What a rejected row sends now: its images as sent before, the other fields as the
    config maps them now, and a new seed unless the config gives the row one (then True)."""
    mapped = manifest.mapper.map(target.row_number, target.record)
    if not isinstance(mapped, JobSpec):
        raise ConfigError(
            f"row {target.row_number} ({target.job_id}) cannot be sent again under this config: "
            f"{mapped.reason}; nothing was recorded or sent"
        )
    inputs = {f: v for f, v in target.inputs.items() if f in IMAGE_FIELDS}
    inputs.update({f: v for f, v in mapped.inputs.items() if f not in IMAGE_FIELDS})
    if "seed" not in mapped.inputs:
        earlier = target.inputs.get("seed")
        seed = earlier
        while seed == earlier:
            seed = SEED_RANGE[0] + secrets.randbelow(SEED_RANGE[1] - SEED_RANGE[0] + 1)
        inputs["seed"] = seed
    return {f: inputs[f] for f in INPUT_FIELDS if f in inputs}, "seed" not in mapped.inputs


def _tell(path: Path, done: Reviewed) -> None:
    """One line for the log, and one said on the terminal for decisions left out."""
    left = sum(len(lines) for lines in done.left_out.values())
    _log.warning(
        "reviewed",
        file=str(path),
        approved=done.approved,
        redone=done.redone,
        left_out=left,
        said=f"{path}: {done.approved:,} approved, {done.redone:,} rejected and made again, "
        f"{left:,} left out" + (" (why below)" if left else ""),
    )
    for why, lines in done.left_out.items():
        shown = ", ".join(map(str, lines[:_SHOWN])) + (" ..." if len(lines) > _SHOWN else "")
        _log.warning(
            "decisions_left_out",
            count=len(lines),
            reason=why,
            said=f"{len(lines)} decision(s) in {path} left out: {why} (lines {shown})",
        )


def approve_passing(journal: Journal, state: StateStore | None) -> int:
    """`--approve-passing`: every edit no person has judged whose images all passed the
    automatic checks is approved (noted as such); how many rows."""
    rows = journal.checks.passing_undecided()
    note = "approved: passed the automatic checks"
    journal.reviews.record_review([(row, note) for row in rows], [])
    if state is not None and rows:
        targets = journal.reviews.review_targets(rows)
        state.approve((t.prediction_id, note) for t in targets.values() if t.prediction_id)
    _log.warning(
        "approved_passing",
        rows=len(rows),
        said=f"{len(rows):,} edit(s) that passed every check approved (--approve-passing)",
    )
    return len(rows)
