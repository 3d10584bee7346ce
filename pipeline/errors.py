"""The exception tree; provider answers and transport failures are translated in `client` only.

    WanbatchError
    ├── ConfigError            bad YAML or values: stops before any request
    ├── ManifestError          the manifest file as a whole cannot be read
    ├── RunFolderError         the run folder cannot be used: stops before any request
    │   ├── RunFolderLocked    another run holds the folder now
    │   ├── RunFolderMismatch  the folder belongs to another config or manifest
    │   └── JournalDamaged     the journal cannot be read as a database
    ├── NoUsableKeyError       every API key was refused (401): the run stops, rows stay pending
    └── ApiError               one request to the provider went wrong
        ├── InvalidInput       400: final, never retried
        ├── Unauthorized       401: the key is retired
        ├── NotFound           404: unknown model or prediction
        ├── RateLimited        429: wait (Retry-After when given), then try again
        ├── ServerError        5xx: retry with backoff
        ├── TransportFailure   no usable answer (connect, read, reset, timeout): retry with backoff
        └── ProtocolViolation  an answer we cannot read: retry with backoff
            └── UnsafePredictionId  an id that cannot go into a URL: final, a possible charge

A create that failed after its request may have reached the provider (a read error, a reset, a
gateway 502/504) is *ambiguous*: the job may exist and be billed. `ApiError.ambiguous` says so.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "ConfigError",
    "InvalidInput",
    "JournalDamaged",
    "ManifestError",
    "NoUsableKeyError",
    "NotFound",
    "ProtocolViolation",
    "RateLimited",
    "RunFolderError",
    "RunFolderLocked",
    "RunFolderMismatch",
    "ServerError",
    "TransportFailure",
    "Unauthorized",
    "UnsafePredictionId",
    "WanbatchError",
]


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
