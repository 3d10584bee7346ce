"""The values every wing shares, and nothing that does work: the config (validated), the
exception tree and exit codes, the job records and their status vocabulary, the counters, the
keys, the provider's input schema, the clock, and where bytes are read and written (local
paths and object URLs).

    config.py    the run's settings: every key, its default and its bounds
    errors.py    the exception tree, and the exit codes a scheduler acts on
    records.py   a row's job, its outcome, and the status vocabulary (Status, OPEN, FINISHED)
    counters.py  the run's counters, declared once
    schema.py    the provider's input fields and rules
    keys.py      API keys, named by a short hash
    cells.py     what a manifest cell holds
    clock.py     the time the waiting parts read and sleep on
    storage.py   local paths and object URLs (obstore)
    faults.py    the sandbox's faults, as the config names them
"""

from __future__ import annotations

from pipeline.core.cells import ZERO_WIDTH, is_blank, to_int
from pipeline.core.clock import Clock, SystemClock
from pipeline.core.config import (
    KEPT_MANIFEST,
    AssetsSection,
    LimitsSection,
    ManifestSection,
    RunConfig,
    WebhookSection,
    apply_overrides,
    load_config,
    parse_config,
)
from pipeline.core.counters import COUNTERS, CallbackStats, DownloadStats, RunStats
from pipeline.core.errors import (
    ERROR_TYPES,
    TRANSIENT_ERRORS,
    ApiError,
    BudgetReached,
    ConfigError,
    CostsUnconfirmed,
    ExitCode,
    InvalidInput,
    JournalDamaged,
    KeysMissing,
    KeysRefused,
    ManifestError,
    NotFound,
    NoUsableKeyError,
    ProtocolViolation,
    RateLimited,
    RowsFailed,
    RunEnded,
    RunFailed,
    RunFolderError,
    RunFolderLocked,
    RunFolderMismatch,
    RunInterrupted,
    ServerError,
    TransportFailure,
    Unauthorized,
    UnsafePredictionId,
    WanbatchError,
)
from pipeline.core.faults import FaultRates, sandbox_keys
from pipeline.core.keys import ENV_KEY, ENV_KEYS, ApiKey, keys_from_env, resolve_groups
from pipeline.core.records import (
    DECISION_COLUMNS,
    FINISHED,
    MAY_BE_BILLED,
    OPEN,
    RESOLUTIONS,
    REVIEWS,
    Decision,
    JobOutcome,
    JobSpec,
    PriorSuccess,
    Rejected,
    Status,
    StoredCopy,
)
from pipeline.core.schema import (
    IMAGE_EXTENSIONS,
    IMAGE_FIELDS,
    INPUT_FIELDS,
    MAX_INPUT_BYTES,
    SEED_RANGE,
    TRANSIENT_ERROR_CODES,
    UPLOAD_TOKEN,
    check_input,
    fingerprint,
)
from pipeline.core.storage import (
    ObjectStore,
    ObjectTooLarge,
    copy_object,
    is_object_url,
    located,
    read_object,
)

__all__ = [
    "COUNTERS",
    "DECISION_COLUMNS",
    "ENV_KEY",
    "ENV_KEYS",
    "ERROR_TYPES",
    "FINISHED",
    "IMAGE_EXTENSIONS",
    "IMAGE_FIELDS",
    "INPUT_FIELDS",
    "KEPT_MANIFEST",
    "MAX_INPUT_BYTES",
    "MAY_BE_BILLED",
    "OPEN",
    "RESOLUTIONS",
    "REVIEWS",
    "SEED_RANGE",
    "TRANSIENT_ERRORS",
    "TRANSIENT_ERROR_CODES",
    "UPLOAD_TOKEN",
    "ZERO_WIDTH",
    "ApiError",
    "ApiKey",
    "AssetsSection",
    "BudgetReached",
    "CallbackStats",
    "Clock",
    "ConfigError",
    "CostsUnconfirmed",
    "Decision",
    "DownloadStats",
    "ExitCode",
    "FaultRates",
    "InvalidInput",
    "JobOutcome",
    "JobSpec",
    "JournalDamaged",
    "KeysMissing",
    "KeysRefused",
    "LimitsSection",
    "ManifestError",
    "ManifestSection",
    "NoUsableKeyError",
    "NotFound",
    "ObjectStore",
    "ObjectTooLarge",
    "PriorSuccess",
    "ProtocolViolation",
    "RateLimited",
    "Rejected",
    "RowsFailed",
    "RunConfig",
    "RunEnded",
    "RunFailed",
    "RunFolderError",
    "RunFolderLocked",
    "RunFolderMismatch",
    "RunInterrupted",
    "RunStats",
    "ServerError",
    "Status",
    "StoredCopy",
    "SystemClock",
    "TransportFailure",
    "Unauthorized",
    "UnsafePredictionId",
    "WanbatchError",
    "WebhookSection",
    "apply_overrides",
    "check_input",
    "copy_object",
    "fingerprint",
    "is_blank",
    "is_object_url",
    "keys_from_env",
    "load_config",
    "located",
    "parse_config",
    "read_object",
    "resolve_groups",
    "sandbox_keys",
    "to_int",
]
