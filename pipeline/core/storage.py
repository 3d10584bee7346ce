"""Object storage through obstore: the image store, input uploads, and files given as URLs.

Credentials and endpoint come from the standard environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_NAME, ...) as obstore
reads them, plus `assets.storage_options`; neither is ever put into a message. obstore is
imported only by runs that use object storage.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.core.errors import ConfigError

__all__ = [
    "OBJECT_SCHEMES",
    "ObjectStore",
    "ObjectTooLarge",
    "file_sha256",
    "is_object_url",
    "located",
    "read_object",
    "read_stored",
    "said",
]


def file_sha256(path: Path) -> str:
    """A local file's SHA-256 (hex), read a megabyte at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# the URL schemes of the object stores obstore speaks to
OBJECT_SCHEMES = frozenset({"s3", "s3a", "gs", "az", "azure", "abfs", "abfss"})


def is_object_url(value: str) -> bool:
    return "://" in value and urlsplit(value).scheme.lower() in OBJECT_SCHEMES


def located(path: str, run_dir: Path | str) -> str:
    """Where a stored copy is: an object URL or an absolute path as it is, a path relative to
    the run folder (as the journal keeps a copy made there, so the folder can move) joined to
    it."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(Path(run_dir, path))


def read_stored(path: str, run_dir: Path | str, options: dict[str, str], limit: int) -> bytes:
    """A stored copy's bytes, wherever `located` puts it: a local file, or an object
    (FileNotFoundError when it is gone, ObjectTooLarge over `limit`, OSError otherwise)."""
    where = located(path, run_dir)
    if "://" in where:
        return read_object(where, options, limit)
    return Path(where).read_bytes()


PROBE = ".wanbatch-probe"  # written and deleted by a store's check
# loopback object servers in tests speak plain HTTP; a real bucket's HTTPS is unaffected
_CLIENT = {"allow_http": True}


def said(exc: BaseException) -> str:
    """An obstore error in one line, without the XML bodies and debug dumps it appends."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def _make(url: str, options: dict[str, str]) -> Any:
    from obstore.store import from_url

    make: Any = from_url  # its overloads are per scheme; the scheme is the user's
    return make(url, config=options or None, client_options=_CLIENT)


# where the standard environment and storage options name an endpoint
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT")


def _store_failure(exc: BaseException) -> bool:
    """An error of the store library (any Exception, or a Rust panic, which pyo3 raises as a
    BaseException) as opposed to an interrupt or a cancellation."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _check_endpoints(options: dict[str, str]) -> None:
    """ConfigError for an endpoint that is no URL (the store library panics on some)."""
    named = [(name, os.environ.get(name)) for name in _ENDPOINT_VARIABLES]
    named += [(f"storage_options.{k}", v) for k, v in options.items() if "endpoint" in k.lower()]
    for name, value in named:
        if not value:
            continue
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # a port that is no number raises here
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{name} {value[:80]!r} is not an http(s) URL of an endpoint")


class ObjectStore:
    """A bucket and prefix: whole-object puts, existence, presigned GETs. `what` names the
    config setting in messages."""

    def __init__(self, url: str, options: dict[str, str], *, what: str = "assets.store") -> None:
        self.url = url.rstrip("/")
        self._what = what
        _check_endpoints(options)
        try:
            self._store = _make(self.url, options)
        except BaseException as exc:  # obstore's errors share no base; a panic is a BaseException
            if not _store_failure(exc):
                raise
            raise ConfigError(f"{what} {self.url} cannot be used: {said(exc)}") from None

    def check(self) -> None:
        """ConfigError when a probe object cannot be written and deleted: called before
        anything is sent (a bucket that can be listed may still refuse writes)."""
        import obstore

        try:
            obstore.put(self._store, PROBE, b"wanbatch store probe")
            obstore.delete(self._store, PROBE)
        except BaseException as exc:  # see __init__
            if not _store_failure(exc):
                raise
            raise ConfigError(f"{self._what} {self.url} cannot be used: {said(exc)}") from None

    def put(self, name: str, data: bytes) -> str:
        """Write `name` whole (one PUT); where it is."""
        import obstore

        try:
            obstore.put(self._store, name, data)
        except Exception as exc:  # noqa: BLE001 - see __init__
            raise OSError(f"cannot store {name}: {said(exc)}") from None
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        import obstore

        try:
            obstore.head(self._store, name)
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001 - see __init__
            raise OSError(f"cannot look up {name}: {said(exc)}") from None
        return True

    def get(self, name: str) -> bytes:
        """The object's bytes: FileNotFoundError when it is not there, OSError otherwise."""
        import obstore

        try:
            return bytes(obstore.get(self._store, name).bytes())
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - see __init__
            raise OSError(f"cannot read {name}: {said(exc)}") from None

    def delete(self, name: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, name)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - see __init__
            raise OSError(f"cannot delete {name}: {said(exc)}") from None

    def sign(self, name: str, lifetime: datetime.timedelta) -> str:
        """A presigned HTTPS GET of `name`, valid for `lifetime` from now."""
        import obstore

        return str(obstore.sign(self._store, "GET", name, lifetime))


def read_object(url: str, options: dict[str, str], limit: int) -> bytes:
    """One object, given by its URL (s3://bucket/key, ...): FileNotFoundError when it is not
    there, ObjectTooLarge over `limit` bytes, OSError with a one-line reason otherwise."""
    import obstore

    parts = urlsplit(url)
    key = parts.path.lstrip("/")
    try:
        store = _make(f"{parts.scheme}://{parts.netloc}", options)
        size = int(obstore.head(store, key)["size"])
        if size > limit:
            raise ObjectTooLarge(size)
        return bytes(obstore.get(store, key).bytes())
    except (FileNotFoundError, ObjectTooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - see ObjectStore.__init__
        raise OSError(said(exc)) from None


def copy_object(url: str, dest: Path, options: dict[str, str]) -> None:
    """Copy an object to a local file, streamed, under a temporary name then renamed: the
    file is whole or absent. FileNotFoundError when it is not there, OSError otherwise."""
    import obstore

    parts = urlsplit(url)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        store = _make(f"{parts.scheme}://{parts.netloc}", options)
        with tmp.open("wb") as out:
            for chunk in obstore.get(store, parts.path.lstrip("/")).stream():
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - see ObjectStore.__init__
        tmp.unlink(missing_ok=True)
        raise OSError(said(exc)) from None


class ObjectTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"{size:,} bytes")
        self.size = size
