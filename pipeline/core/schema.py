"""The provider's input schema for Wan 2.7 Image Edit, stated once.

Both sides of the wire read it: the manifest reader checks each row against it before the row
costs anything, and the sandbox enforces it as the provider does. A rule is a pure function of
one input mapping; it returns the violations it finds, each naming the field and the rule.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = [
    "FINAL_ERROR_CODES",
    "IMAGE_EXTENSIONS",
    "IMAGE_FIELDS",
    "INPUT_FIELDS",
    "MAX_INPUT_BYTES",
    "MAX_PROMPT_CHARS",
    "MODEL",
    "SEED_RANGE",
    "SIZES",
    "TRANSIENT_ERROR_CODES",
    "UPLOAD_TOKEN",
    "Violation",
    "check_input",
    "check_url",
    "fingerprint",
    "is_loopback_host",
]

MODEL = "alibaba-wan-2-7-image-edit"
MAX_PROMPT_CHARS = 5000
SIZES = ("1K", "2K")
N_RANGE = (1, 4)
SEED_RANGE = (0, 2**31 - 1)
# the formats the provider takes; a URL whose path ends in another extension is refused, one with
# no extension (a CDN's image endpoint) is left to the provider
IMAGE_EXTENSIONS = ("jpeg", "jpg", "png", "bmp", "webp")
MAX_INPUT_BYTES = 20_000_000  # an input image's limit ("max 20 MB")
# an input this tool uploaded to assets.upload_to, as journaled: "upload:<sha256>.<ext>"; each
# create is sent a presigned URL of it instead
UPLOAD_TOKEN = "upload:"
IMAGE_FIELDS = ("img_url", "img_url_2", "img_url_3", "img_url_4")
INPUT_FIELDS = ("prompt", *IMAGE_FIELDS, "size", "n", "seed")
_REQUIRED = ("prompt", "img_url")
# a failed prediction's `error_code`s whose advice is to retry (network, rate limit, a worker
# lost, a timeout, or a provider-side fault): a failed job costs nothing, so it is created again
TRANSIENT_ERROR_CODES = frozenset(
    {
        "PROVIDER_RATE_LIMIT",
        "PROVIDER_SERVER_ERROR",
        "NETWORK_ERROR",
        "WORKER_LOST",
        "PUBLISH_FAILED",
        "EXECUTION_TIMEOUT",
        "PROVIDER_AUTH_ERROR",
        "PIPELINE_CONFIG_ERROR",
    }
)
# the codes the provider's table calls final (fix the input: invalid, refused, content safety,
# an input it could not fetch): never retried, and never offered to `wanbatch retry`
FINAL_ERROR_CODES = frozenset(
    {"INPUT_VALIDATION_ERROR", "PROVIDER_BAD_REQUEST", "PROVIDER_REJECTED", "INPUT_DOWNLOAD_ERROR"}
)


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken rule: which input field, and what the rule says."""

    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def fingerprint(model: str, inputs: Mapping[str, object]) -> str:
    """What a request would buy: a hash of the model and the canonical input it sends."""
    canonical = _CANONICAL({"model": model, "input": inputs})
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    if ":" not in host and not host[-1:].isdigit():
        return False  # a name: an IPv4 address ends in a digit, an IPv6 one has colons
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address.is_loopback or address.is_unspecified


def check_url(value: object, *, allow_loopback: bool = False) -> str | None:
    """Return the rule a file URL breaks, or None when the provider would take it."""
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string URL"
    if value[:5].lower() == "data:":
        return "data URIs are not accepted; give a public HTTPS URL"
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
    except ValueError:
        return "is not a valid URL"
    if not host:
        return "is not a valid URL (no host)"
    loopback = is_loopback_host(host)
    if loopback and not allow_loopback:
        return "localhost URLs are not accepted; give a publicly reachable HTTPS URL"
    if parts.scheme.lower() != "https" and not (loopback and parts.scheme.lower() == "http"):
        return "must be an HTTPS URL"
    last = parts.path.rsplit("/", 1)[-1]
    if "." in last:
        extension = last.rsplit(".", 1)[-1].lower()
        if extension not in IMAGE_EXTENSIONS:
            return (
                f"names a .{extension[:16]} file; the provider takes "
                + ", ".join(IMAGE_EXTENSIONS).upper()
            )
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_input(inputs: Mapping[str, object], *, allow_loopback: bool = False) -> list[Violation]:
    """Check one prediction input against the provider's schema; an empty list means valid."""
    found: list[Violation] = []
    for name in inputs:
        if name not in INPUT_FIELDS:
            found.append(
                Violation(name, f"unknown input field (allowed: {', '.join(INPUT_FIELDS)})")
            )
    for name in _REQUIRED:
        if inputs.get(name) is None:
            found.append(Violation(name, "is required"))
    prompt = inputs.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            found.append(Violation("prompt", "must be a non-empty string"))
        elif len(prompt) > MAX_PROMPT_CHARS:
            found.append(
                Violation("prompt", f"is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
            )
    for name in IMAGE_FIELDS:
        url = inputs.get(name)
        if url is not None and (rule := check_url(url, allow_loopback=allow_loopback)):
            found.append(Violation(name, rule))
    size = inputs.get("size")
    if size is not None and size not in SIZES:
        found.append(Violation("size", f"must be one of {', '.join(SIZES)}, not {size!r}"))
    n = inputs.get("n")
    if n is not None and (not _is_int(n) or not N_RANGE[0] <= n <= N_RANGE[1]):  # type: ignore[operator]
        found.append(
            Violation("n", f"must be an integer from {N_RANGE[0]} to {N_RANGE[1]}, not {n!r}")
        )
    seed = inputs.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):  # type: ignore[operator]
        found.append(
            Violation(
                "seed",
                f"must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, not {seed!r}",
            )
        )
    return found
