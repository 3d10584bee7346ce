"""The journal's tables in SQLite, and the columns its readers take from them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TypeVar

from pipeline.core import MAY_BE_BILLED, OPEN, Status

_T = TypeVar("_T")
_BOUND = 500  # values bound in one statement: well under SQLite's limit on variables


def in_chunks(values: Sequence[_T]) -> Iterator[tuple[Sequence[_T], str]]:
    """`values` a chunk at a time, each with its placeholders (`?,?,...`) for an `IN (...)`."""
    for start in range(0, len(values), _BOUND):
        chunk = values[start : start + _BOUND]
        yield chunk, ",".join("?" * len(chunk))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    row_number INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT,
    inputs TEXT,
    record TEXT NOT NULL,
    status TEXT NOT NULL,
    prediction_id TEXT,
    key_name TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    ambiguous INTEGER NOT NULL DEFAULT 0,
    output_urls TEXT,
    images INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    predict_time_s REAL,
    error_type TEXT,
    error_message TEXT,
    started_at REAL,
    created_at REAL,
    finished_at REAL,
    reused INTEGER NOT NULL DEFAULT 0,
    history TEXT,
    error_code TEXT,
    cancel_accepted INTEGER,
    follows INTEGER,
    provider_cost_usd REAL,
    priced_cost_usd REAL,
    unconfirmed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(status, row_number);
CREATE INDEX IF NOT EXISTS jobs_fingerprint ON jobs(fingerprint) WHERE fingerprint IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_prediction ON jobs(prediction_id) WHERE prediction_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS images (
    row_number INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    path TEXT,
    sha256 TEXT,
    bytes INTEGER,
    width INTEGER,
    height INTEGER,
    format TEXT,
    error TEXT,
    checks TEXT,
    checks_failed TEXT,
    PRIMARY KEY (row_number, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS images_state ON images(state, row_number);
"""


# columns added since the first journals: a journal made before them gets them on opening
_ADDED = {
    "error_code": "TEXT",
    "cancel_accepted": "INTEGER",
    "follows": "INTEGER",
    "provider_cost_usd": "REAL",
    "priced_cost_usd": "REAL",
    "unconfirmed": "INTEGER NOT NULL DEFAULT 0",
    "review": "TEXT",  # a person's decision on the row's current edit (REVIEWS)
    "review_note": "TEXT",
    # what the row's earlier edits cost (rejected and made again): still paid for
    "earlier_cost_usd": "REAL NOT NULL DEFAULT 0",
    "sent_at": "REAL",  # when the row's last create was sent
    # of its `ambiguous` creates, how many were resolved (RESOLUTIONS but `unresolved`), and
    # how the last one was
    "resolved": "INTEGER NOT NULL DEFAULT 0",
    "resolution": "TEXT",
    # the seed drawn for the row's last create when its input has none, journaled before the
    # create is sent: the provider's copy of the input then names the row and the attempt
    "sent_seed": "INTEGER",
    "served_by": "TEXT",  # the backup model of a fallback chain that served the job
}


# the same, of the images table: the checks' measures ({rule: [value, bound, threshold]}) and
# the rules failed (a JSON list; NULL: not measured)
_ADDED_IMAGES = {"checks": "TEXT", "checks_failed": "TEXT"}

# the rules a job's images failed, as one JSON list (NULL when none was measured)
_FAILED = (
    "(CASE WHEN EXISTS(SELECT 1 FROM images WHERE images.row_number = jobs.row_number"
    " AND images.checks_failed IS NOT NULL) THEN (SELECT json_group_array(DISTINCT f.value)"
    " FROM images, json_each(images.checks_failed) AS f"
    " WHERE images.row_number = jobs.row_number) END)"
)


# a job's measured images, in output order, as a JSON array of {i: index, c: measures, f:
# rules failed}
_CHECKED = (
    "(SELECT json_group_array(json_object('i', idx, 'c', json(checks), 'f', json(checks_failed)))"
    " FROM (SELECT idx, checks, checks_failed FROM images WHERE images.row_number ="
    " jobs.row_number AND checks_failed IS NOT NULL ORDER BY idx))"
)


# a row's outcome cleared for it to be sent again (`retry`, a rejected edit); what it cost
# stays counted in earlier_cost_usd
_CLEARED_OUTCOME = (
    "output_urls=NULL, images=0, cost_usd=0, predict_time_s=NULL, error_type=NULL,"
    " error_message=NULL, error_code=NULL, cancel_accepted=NULL, finished_at=NULL,"
    " provider_cost_usd=NULL, priced_cost_usd=NULL, unconfirmed=0, served_by=NULL,"
    " sent_seed=NULL,"
    " earlier_cost_usd=earlier_cost_usd + cost_usd"
)

# a job's stored image paths, in output order, as a JSON array (None where not stored)
_PATHS = (
    "(SELECT json_group_array(path) FROM (SELECT path FROM images"
    " WHERE images.row_number = jobs.row_number ORDER BY idx))"
)


# a job that may exist at the provider with no end seen: its cost may be billed
_UNCONFIRMED = f"(status IN {tuple(s.value for s in MAY_BE_BILLED)} OR unconfirmed = 1)"


# made once: json.dumps with any argument of its own builds a new encoder on every call
_RECORD = json.JSONEncoder(default=str, ensure_ascii=False).encode


_INPUTS = json.JSONEncoder(ensure_ascii=False).encode


# REAL values are written with 15 significant digits: every one here is rounded well below that
_RESULT_COLUMNS = (
    """row_number, record, inputs, history, sent_seed, json_object(
    'job_id', job_id, 'row_number', row_number, 'status', status,
    'prediction_id', prediction_id,
    'output_urls', json(COALESCE(NULLIF(output_urls, ''), '[]')),
    'images', images, 'cost_usd', cost_usd, 'provider_cost_usd', provider_cost_usd,
    'priced_cost_usd', COALESCE(priced_cost_usd, cost_usd),
    'unconfirmed', json(CASE WHEN """
    + _UNCONFIRMED
    + """ THEN 'true' ELSE 'false' END),
    'predict_time_s', predict_time_s,
    'latency_s', CASE WHEN started_at AND finished_at THEN round(finished_at - started_at, 4) END,
    'attempts', attempts, 'ambiguous_creates', ambiguous,
    'possible_duplicate_charge',
    json(CASE WHEN ambiguous > resolved THEN 'true' ELSE 'false' END),
    'create_resolution', resolution, 'served_by', served_by,
    'reused', json(CASE WHEN reused THEN 'true' ELSE 'false' END),
    'error_type', error_type, 'error_code', error_code, 'error_message', error_message,
    'cancel_accepted', json(CASE cancel_accepted WHEN 1 THEN 'true' WHEN 0 THEN 'false' END),
    'created_at', CASE WHEN created_at THEN CAST(created_at * 1000000 AS INTEGER) END,
    'finished_at', CASE WHEN finished_at THEN CAST(finished_at * 1000000 AS INTEGER) END,
    'key', key_name, 'review', review, 'review_note', review_note
) AS outcome, (
    SELECT json_object(
        'path', json_group_array(path), 'sha256', json_group_array(sha256),
        'bytes', json_group_array(bytes), 'width', json_group_array(width),
        'height', json_group_array(height), 'state', json_group_array(state),
        'failed', json_group_array(checks_failed)
    ) FROM (SELECT * FROM images WHERE images.row_number = jobs.row_number ORDER BY idx)
) AS stored"""
)


_OPEN = tuple(s.value for s in OPEN)


# the images a job asks for, from its journaled input (a rejected row has none)
_WANTED = "COALESCE(json_extract(inputs, '$.n'), 1)"


# no create of the row's inputs is out
_UNSENT = (Status.PENDING.value, Status.REJECTED.value, Status.SKIPPED.value)
