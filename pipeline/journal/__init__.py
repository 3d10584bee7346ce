"""journal."""

from __future__ import annotations

from pipeline.journal.incremental import StateStore
from pipeline.journal.store import (
    TRANSIENT_ERRORS,
    Commits,
    CostBooks,
    Entry,
    FailImage,
    Finish,
    GroupCommit,
    Journal,
    MarkCreated,
    MarkCreating,
    MarkPending,
    NoteAmbiguous,
    NoteCancel,
    StoreImage,
    Update,
    unique,
)

__all__ = [
    "TRANSIENT_ERRORS",
    "Commits",
    "CostBooks",
    "Entry",
    "FailImage",
    "Finish",
    "GroupCommit",
    "Journal",
    "MarkCreated",
    "MarkCreating",
    "MarkPending",
    "NoteAmbiguous",
    "NoteCancel",
    "StateStore",
    "StoreImage",
    "Update",
    "unique",
]
