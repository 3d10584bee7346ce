"""API keys: read from the environment only, and known everywhere else by a short hash."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from pipeline.core.errors import ConfigError

__all__ = ["ENV_KEY", "ENV_KEYS", "ApiKey", "keys_from_env", "resolve_groups"]

ENV_KEY = "EACHLABS_API_KEY"
ENV_KEYS = "EACHLABS_API_KEYS"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A secret that never prints: its repr and str show only `name`, a short hash."""

    secret: str = field(repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            digest = hashlib.sha256(self.secret.encode()).hexdigest()[:8]
            object.__setattr__(self, "name", f"key-{digest}")

    def __str__(self) -> str:
        return self.name


def _well_formed(secret: str) -> bool:
    """Printable ASCII without whitespace: what an HTTP header value can carry as it is."""
    return all("!" <= char <= "~" for char in secret)


def keys_from_env(environ: Mapping[str, str] | None = None) -> list[ApiKey]:
    """Keys from `EACHLABS_API_KEYS` (comma-separated), else `EACHLABS_API_KEY`; maybe none."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_KEYS) or env.get(ENV_KEY) or ""
    variable = ENV_KEYS if env.get(ENV_KEYS) else ENV_KEY
    secrets = [part.strip() for part in raw.split(",") if part.strip()]
    keys: list[ApiKey] = []
    for position, secret in enumerate(secrets, start=1):
        if not _well_formed(secret):
            # named by its position: printing it would leak it, and its hash helps nobody
            raise ConfigError(
                f"{variable}: key {position} of {len(secrets)} is not printable ASCII without "
                "whitespace (a line break, a space, a control or a non-ASCII character); "
                "check how the variable is set"
            )
        key = ApiKey(secret)
        if key in keys:
            raise ConfigError(f"{ENV_KEYS} lists the same key twice ({key.name})")
        keys.append(key)
    return keys


def resolve_groups(groups: list[list[int | str]], keys: list[ApiKey]) -> list[list[str]]:
    """limits.groups as key names: each member given by its 1-based position in the keys or
    by its hash; a hash of a key not given is left out, a position out of range refused."""
    named: list[list[str]] = []
    for number, group in enumerate(groups, start=1):
        members = [_member(member, keys, number) for member in group]
        named.append([name for name in members if name is not None])
    return named


def _member(member: int | str, keys: list[ApiKey], group: int) -> str | None:
    if isinstance(member, int):
        if not 1 <= member <= len(keys):
            raise ConfigError(
                f"limits.groups[{group - 1}]: key {member} is not one of the {len(keys)} keys "
                f"given in {ENV_KEYS}"
            )
        return keys[member - 1].name
    return member if any(k.name == member for k in keys) else None
