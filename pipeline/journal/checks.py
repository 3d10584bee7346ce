"""The automatic checks in the journal: the stored images still to measure, their measures
recorded, and what they decide (rows to make again, rows that passed, counts by rule)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core import Status
from pipeline.journal.file import JournalFile
from pipeline.journal.tables import _FAILED

__all__ = ["CheckTarget", "Checks", "Measured"]

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
# a row's edits the checks rejected and had made again
_BY_CHECKS = (
    "(SELECT COUNT(*) FROM json_each(jobs.history)"
    " WHERE json_extract(json_each.value, '$.rejected_by') = 'checks')"
)

# a succeeded row (`j`) no person has judged whose every image was measured and passed
_PASSING = (
    "j.status=? AND j.review IS NULL"
    " AND EXISTS(SELECT 1 FROM images i WHERE i.row_number = j.row_number)"
    " AND NOT EXISTS(SELECT 1 FROM images i WHERE i.row_number = j.row_number"
    " AND (i.checks_failed IS NULL OR i.checks_failed != '[]'))"
)


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """A stored image to measure: where it is, and what its job asked for."""

    row_number: int
    index: int
    path: str
    source: str | None  # the job's first input image (a URL), to compare with
    size: str | None  # 1K or 2K


@dataclass(frozen=True, slots=True)
class Measured:
    """An image's measures ({rule: (value, bound, threshold)}) and the rules it failed."""

    row_number: int
    index: int
    values: Mapping[str, tuple[float | None, str, float]]
    failed: list[str]


class Checks:
    """The automatic checks' measures recorded in the journal, and what they decide."""

    def __init__(self, file: JournalFile) -> None:
        self._file = file
        self._db = file.db
        self._lock = file.lock

    def images_to_check(self, batch_size: int = 2000) -> Iterator[list[CheckTarget]]:
        """The stored images of succeeded rows that no check has measured, a batch at a time."""
        select = (
            "SELECT i.row_number, i.idx, i.path, json_extract(j.inputs, '$.img_url'),"
            " json_extract(j.inputs, '$.size') FROM images i JOIN jobs j"
            " ON j.row_number = i.row_number"
        )
        where = "i.state = 'stored' AND i.checks_failed IS NULL AND j.status = ?"
        for got in self._file.image_pages(select, where, (Status.SUCCEEDED.value,), batch_size):
            yield [
                CheckTarget(int(r[0]), int(r[1]), str(r[2]), _text(r[3]), _text(r[4])) for r in got
            ]

    def record_checks(self, measured: Sequence[Measured]) -> None:
        with self._lock, self._file.transaction():
            self._db.executemany(
                "UPDATE images SET checks=?, checks_failed=? WHERE row_number=? AND idx=?",
                [(_ENCODE(m.values), _ENCODE(m.failed), m.row_number, m.index) for m in measured],
            )

    def to_regenerate(self, most: int) -> list[int]:
        """Succeeded rows no person has judged whose edit failed a check, and that the checks
        had made again fewer than `most` times; in row order. A row that shares another's
        edit (`follows`) is left to that row, and an edit reused from an earlier night is
        not made again by this one (that night had its own rounds)."""
        with self._lock:
            got = self._db.execute(
                f"SELECT row_number FROM jobs WHERE status=? AND review IS NULL"
                f" AND follows IS NULL AND reused = 0 AND {_BY_CHECKS} < ?"
                f" AND COALESCE({_FAILED}, '[]') != '[]' ORDER BY row_number",
                (Status.SUCCEEDED.value, most),
            ).fetchall()
        return [int(r[0]) for r in got]

    def passing_undecided(self) -> list[int]:
        """Succeeded rows no person has judged whose every image was measured and passed."""
        with self._lock:
            got = self._db.execute(
                f"SELECT j.row_number FROM jobs j WHERE {_PASSING} ORDER BY j.row_number",
                (Status.SUCCEEDED.value,),
            ).fetchall()
        return [int(r[0]) for r in got]

    def check_counts(self) -> dict[str, Any]:
        """Images measured, passed and failed; failures by rule; the edits the checks had
        made again; and the undecided edits that passed every check."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(checks_failed), COALESCE(SUM(checks_failed = '[]'), 0)"
                " FROM images i JOIN jobs j ON j.row_number = i.row_number WHERE j.status=?",
                (Status.SUCCEEDED.value,),
            ).fetchone()
            rules = self._db.execute(
                "SELECT f.value, COUNT(*) FROM images i JOIN jobs j"
                " ON j.row_number = i.row_number, json_each(i.checks_failed) AS f"
                " WHERE j.status=? GROUP BY f.value ORDER BY f.value",
                (Status.SUCCEEDED.value,),
            ).fetchall()
            passing = self._db.execute(
                f"SELECT COUNT(*) FROM jobs j WHERE {_PASSING}", (Status.SUCCEEDED.value,)
            ).fetchone()
            again = self._db.execute(
                f"SELECT COALESCE(SUM({_BY_CHECKS}), 0) FROM jobs WHERE history IS NOT NULL"
            ).fetchone()
        measured, passed = int(row[0]), int(row[1])
        return {
            "measured": measured,
            "passed": passed,
            "failed": measured - passed,
            "by_rule": {str(r[0]): int(r[1]) for r in rules},
            "regenerated": int(again[0]),
            # edits no person has judged that passed every check: --approve-passing's
            "passing_undecided": int(passing[0]),
        }


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
