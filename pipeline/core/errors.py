"""The exception tree; provider answers and transport failures are translated in `client` only.

    WanbatchError
    ├── ConfigError            bad YAML or values: stops before any request
    ├── ManifestError          the manifest file as a whole cannot be read
    ├── RunFolderError         the run folder cannot be used: stops before any request
    │   ├── RunFolderLocked    another run holds the folder now
    │   ├── RunFolderMismatch  the folder belongs to another config or manifest
    │   └── JournalDamaged     the journal cannot be read as a database
    ├── NoUsableKeyError       every API key was refused (401): the run stops, rows stay pending
    ├── RunEnded               (the Python API) a run that ended short of success; `.summary`
    │   ├── RunFailed          exit 1: an error after work began (books finished; resume)
    │   ├── RunInterrupted     exit 3: stopped by a signal (resume)
    │   ├── KeysRefused        exit 4: every key was refused
    │   ├── BudgetReached      exit 5: budget.max_cost_usd reached
    │   ├── RowsFailed         exit 6: finished with failed or rejected rows (or missing images)
    │   ├── KeysMissing        exit 7: jobs wait on keys this run was not given
    │   ├── CostsUnconfirmed   exit 8: jobs created were not seen to end (cost may be billed)
    │   ├── BalanceOut         exit 9: the organisation's balance ran out (top up, resume)
    │   └── ProviderDown       exit 10: the provider stayed unreachable (resume later)
    └── ApiError               one request to the provider went wrong
        ├── InvalidInput       400: final, never retried
        ├── Unauthorized       401: the key is retired
        ├── NotFound           404: unknown model or prediction
        ├── BalanceShort       402, or the 429 that says the balance is low: no create
        ├── Forbidden          403: the operation is not allowed: final
        ├── RateLimited        429: wait (Retry-After when given), then try again
        ├── ServerError        5xx: retry with backoff
        ├── TransportFailure   no usable answer (connect, read, reset, timeout): retry with backoff
        └── ProtocolViolation  an answer we cannot read: retry with backoff
            └── UnsafePredictionId  an id that cannot go into a URL: final, a possible charge

A create that failed after its request may have reached the provider (a read error, a reset, a
gateway 502/504) is *ambiguous*: the job may exist and be billed. `ApiError.ambiguous` says so.
A refusal (any 4xx: 400, 401, 402, 403, 429, ...) made nothing and is never ambiguous.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

__all__ = [
    "ERROR_TYPES",
    "TRANSIENT_ERRORS",
    "ApiError",
    "BalanceOut",
    "BalanceShort",
    "BudgetReached",
    "ConfigError",
    "CostsUnconfirmed",
    "ExitCode",
    "Forbidden",
    "InvalidInput",
    "JournalDamaged",
    "KeysMissing",
    "KeysRefused",
    "ManifestError",
    "NoUsableKeyError",
    "NotFound",
    "ProtocolViolation",
    "ProviderDown",
    "RateLimited",
    "RowsFailed",
    "RunEnded",
    "RunFailed",
    "RunFolderError",
    "RunFolderLocked",
    "RunFolderMismatch",
    "RunInterrupted",
    "ServerError",
    "TransportFailure",
    "Unauthorized",
    "UnsafePredictionId",
    "WanbatchError",
    "ended_by",
]


# Every error_type a failed row can carry (results, failures, `wanbatch retry --errors`),
# declared here alone; the ApiError classes below name theirs from it.
ERROR_TYPES = frozenset(
    {
        "api_error",
        "invalid_input",
        "unauthorized",
        "not_found",
        "rate_limited",
        "server_error",
        "transport",
        "protocol",
        "job_error",  # the provider failed the job
        "input_rejected",  # the provider failed the job with a final code: fix the input
        "timeout",  # cancelled at polling.job_timeout_s
        "cancelled",  # cancelled (a second signal, the budget, or at the provider)
        "ambiguous_create",  # a lost create's answer, with retries.ambiguous_creates: fail
        "not_in_manifest",  # the row left the manifest (--force)
        "forbidden",  # 403: the provider does not allow it
        "balance",  # 402: the organisation's balance (a row is never failed for it)
    }
)
# Failures that say nothing about the row itself: `wanbatch retry` runs these by default.
TRANSIENT_ERRORS = frozenset(
    {"server_error", "transport", "rate_limited", "protocol", "timeout", "job_error"}
)


class ExitCode(IntEnum):
    """What a scheduler can act on; docs/operations.md's table says the same."""

    OK = 0  # finished: every row succeeded
    ERROR = 1  # stopped by an error after work began (books finished, see the message); resume
    BAD_INPUT = 2  # bad config, keys, manifest or run folder, or the folder is held: nothing sent
    INTERRUPTED = 3  # stopped by a signal: run the same command again to resume
    NO_KEY = 4  # every key was refused: fix the key and run again to resume
    BUDGET = 5  # budget.max_cost_usd reached: raise it and run again to resume
    ROWS_FAILED = 6  # finished: some rows failed or were rejected (see failures manifest)
    KEYS_MISSING = 7  # jobs wait on keys this run was not given (or were refused): add them
    UNCONFIRMED = 8  # finished, but jobs created were not seen to end: their cost may be billed
    BALANCE = 9  # the organisation's balance ran out (402): top up, then run again to resume
    PROVIDER_DOWN = 10  # the provider stayed unreachable past retries.outage_patience_s: resume


class WanbatchError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(WanbatchError):
    pass


class ManifestError(WanbatchError):
    pass


class RunFolderError(WanbatchError):
    pass


class RunFolderLocked(RunFolderError):
    pass


class RunFolderMismatch(RunFolderError):
    pass


class JournalDamaged(RunFolderError):
    pass


class NoUsableKeyError(WanbatchError):
    pass


class RunEnded(WanbatchError):
    """A run that ended short of success; `summary` says how far it got (a RunSummary)."""

    exit_code: int = ExitCode.ERROR

    def __init__(self, message: str, summary: Any) -> None:
        super().__init__(message)
        self.summary = summary


class RunFailed(RunEnded):
    exit_code: int = ExitCode.ERROR


class RunInterrupted(RunEnded):
    exit_code: int = ExitCode.INTERRUPTED


class KeysRefused(RunEnded):
    exit_code: int = ExitCode.NO_KEY


class BudgetReached(RunEnded):
    exit_code: int = ExitCode.BUDGET


class RowsFailed(RunEnded):
    exit_code: int = ExitCode.ROWS_FAILED


class KeysMissing(RunEnded):
    exit_code: int = ExitCode.KEYS_MISSING


class CostsUnconfirmed(RunEnded):
    exit_code: int = ExitCode.UNCONFIRMED


class BalanceOut(RunEnded):
    exit_code: int = ExitCode.BALANCE


class ProviderDown(RunEnded):
    exit_code: int = ExitCode.PROVIDER_DOWN


def ended_by(code: int) -> type[RunEnded] | None:
    """The exception a run that ended with this exit code raises from Python (None: 0, or a
    code no run ends with), read from the tree's own declarations, not listed again."""
    return next((c for c in RunEnded.__subclasses__() if c.exit_code == code), None)


class ApiError(WanbatchError):
    """A failed request. `error_type` is the short name written to results; `retryable` says
    whether the same request may be sent again."""

    error_type = "api_error"
    retryable = True

    def __init__(self, message: str, *, status: int | None = None, ambiguous: bool = False):
        super().__init__(message)
        self.status = status
        self.ambiguous = ambiguous


class InvalidInput(ApiError):
    error_type = "invalid_input"
    retryable = False


class Unauthorized(ApiError):
    error_type = "unauthorized"
    retryable = False


class NotFound(ApiError):
    error_type = "not_found"
    retryable = False


class BalanceShort(ApiError):
    """The organisation's balance cannot take the create (402, or a 429 saying the balance is
    low): nothing was created; no create goes out on any key until a top-up."""

    error_type = "balance"
    retryable = False


class Forbidden(ApiError):
    error_type = "forbidden"
    retryable = False


class RateLimited(ApiError):
    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None, status: int = 429):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ServerError(ApiError):
    error_type = "server_error"


class TransportFailure(ApiError):
    error_type = "transport"


class ProtocolViolation(ApiError):
    error_type = "protocol"


class UnsafePredictionId(ProtocolViolation):
    """The provider answered with a prediction id we will not put into a request path."""

    retryable = False
