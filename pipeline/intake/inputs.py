"""Input images that are not public HTTPS URLs: local files and objects in buckets.

A manifest cell may name a local path (relative to the manifest's folder), a `file://` URL or an
object-storage URL (`s3://`, `gs://`, `az://`). Before any create, each such input is read and
judged (it exists, is at most 20 MB, and decodes as a format the provider takes), hashed, and
uploaded once per run to `assets.upload_to` under its content hash. The journal keeps the
input as `upload:<sha256>.<ext>`, so what a row buys (its fingerprint) follows the content, not
where it was read from; each create is then sent a fresh presigned HTTPS URL of that upload,
valid for `assets.upload_url_lifetime_s`.

With `manifest.check_urls`, public HTTPS inputs are checked too, before any create (reachable,
an image, at most 20 MB, by HEAD or a ranged GET), so a dead link costs nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import httpx

from pipeline.core import (
    IMAGE_EXTENSIONS,
    IMAGE_FIELDS,
    MAX_INPUT_BYTES,
    UPLOAD_TOKEN,
    ConfigError,
    JobSpec,
    ObjectStore,
    ObjectTooLarge,
    Rejected,
    fingerprint,
    input_thumb,
    is_object_url,
    read_object,
    tls_context,
    write_thumb,
)

__all__ = [
    "InputStage",
    "Uploads",
    "input_kind",
    "open_uploads",
    "probe_url",
]

_FORMATS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp"}  # what the provider takes
_CACHE = 100_000  # inputs judged this run whose verdicts are kept (each a few hundred bytes)
_TAKES = ", ".join(IMAGE_EXTENSIONS).upper()


def input_kind(value: str) -> Literal["url", "file", "object", "upload"]:
    """How an image cell is read: a URL the provider fetches, a local file, an object."""
    if value.startswith(UPLOAD_TOKEN):
        return "upload"
    try:
        if is_object_url(value):
            return "object"
        scheme = urlsplit(value).scheme.lower() if "://" in value else ""
    except ValueError:  # not a URL at all (`http://[::1`): the schema's check says why
        return "url"
    if scheme in ("", "file"):
        return "file"
    return "url"


class BadInput(Exception):
    """The input cannot be sent; the message is the rule it breaks."""


def _judge(data: bytes) -> str:
    """The file extension of an image the provider takes; BadInput otherwise."""
    from PIL import Image, UnidentifiedImageError  # loaded only when inputs are judged

    if len(data) > MAX_INPUT_BYTES:
        raise BadInput(f"is {len(data) / 1e6:.1f} MB; the provider takes at most 20 MB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = str(image.format)
            image.load()  # decodes every pixel: a cut-short file fails here
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadInput("is not an image (it does not decode)") from None
    if kind not in _FORMATS:
        raise BadInput(f"is a {kind} image; the provider takes {_TAKES}")
    return _FORMATS[kind]


class Uploads:
    """`assets.upload_to`: where local and bucket inputs are put, and signed for each create."""

    def __init__(
        self, url: str, options: dict[str, str], lifetime_s: float, *, dry: bool = False
    ) -> None:
        """`dry` (`estimate`): inputs are judged and named, never uploaded."""
        self.url = url.rstrip("/")
        self._store = ObjectStore(url, options, what="assets.upload_to")
        self._lifetime = datetime.timedelta(seconds=lifetime_s)
        self._known: set[str] = set()  # uploaded (or found there) this run
        self._busy: dict[str, threading.Lock] = {}  # one upload of a name at a time
        self.dry = dry

    def check(self) -> None:
        self._store.check()

    def ensure(self, name: str, data: bytes) -> None:
        """Upload `name` unless this run has, or it is there already (an earlier attempt)."""
        if name in self._known or self.dry:
            return
        with self._busy.setdefault(name, threading.Lock()):
            if name not in self._known and not self._store.exists(name):
                self._store.put(name, data)
            self._known.add(name)
        self._busy.pop(name, None)

    def presigned(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """`inputs` with each upload token replaced by a presigned HTTPS URL, made now."""
        sent = dict(inputs)
        for field in IMAGE_FIELDS:
            value = sent.get(field)
            if isinstance(value, str) and value.startswith(UPLOAD_TOKEN):
                sent[field] = self._store.sign(value.removeprefix(UPLOAD_TOKEN), self._lifetime)
        return sent


@dataclass(frozen=True, slots=True)
class _Verdict:
    token: str | None = None  # what the journal keeps (None for a public URL, kept as it is)
    problem: str | None = None


class InputStage:
    """Judges the image inputs of a batch of rows (in the ingest thread): local and bucket
    inputs are uploaded and become tokens; a public URL is probed when `check_urls`. A row
    whose input fails becomes `Rejected`, naming the field, its column and the rule."""

    def __init__(
        self,
        *,
        model: str,
        base_dir: Path,
        columns: Mapping[str, str],
        uploads: Uploads | None,
        storage_options: dict[str, str],
        check_urls: bool,
        concurrency: int,
        thumbs: Path | None = None,
    ) -> None:
        self._thumbs = thumbs  # the report's input thumbnails, made from what is read
        self._model = model
        self._base_dir = base_dir
        self._columns = columns
        self.uploads = uploads
        self._options = storage_options
        self._check_urls = check_urls
        self._concurrency = max(1, concurrency)
        self._verdicts: OrderedDict[str, _Verdict] = OrderedDict()
        self._http: httpx.Client | None = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    def needed(self, value: str) -> bool:
        kind = input_kind(value)
        return kind in ("file", "object") or (kind == "url" and self._check_urls)

    def apply(self, batch: list[JobSpec | Rejected]) -> list[JobSpec | Rejected]:
        """The batch with its inputs judged; rows without such inputs pass untouched."""
        wanted = {
            value
            for item in batch
            if isinstance(item, JobSpec)
            for field in IMAGE_FIELDS
            if isinstance(value := item.inputs.get(field), str)
            and value not in self._verdicts
            and self.needed(value)
        }
        if wanted:
            self._judge_all(wanted)
        return [self._settle(item) if isinstance(item, JobSpec) else item for item in batch]

    def _judge_all(self, values: Iterable[str]) -> None:
        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="inputs") as pool:
            for value, verdict in zip(values, pool.map(self._verdict, values), strict=True):
                self._verdicts[value] = verdict
        while len(self._verdicts) > _CACHE:
            self._verdicts.popitem(last=False)

    def _verdict(self, value: str) -> _Verdict:
        try:
            kind = input_kind(value)
            if kind == "url":
                probe_url(self._client(), value)
                return _Verdict()
            if self.uploads is None:
                raise BadInput(
                    "is a local file or bucket object, which the provider cannot fetch: set "
                    "assets.upload_to (s3://, gs:// or az://) to upload it, or give an HTTPS URL"
                )
            data = self._read(value, kind)
            extension = _judge(data)
            name = f"inputs/{hashlib.sha256(data).hexdigest()}.{extension}"
            self.uploads.ensure(name, data)
            if self._thumbs is not None and not self.uploads.dry:
                with contextlib.suppress(OSError, ValueError):
                    write_thumb(self._thumbs, input_thumb(UPLOAD_TOKEN + name), data)
            return _Verdict(token=UPLOAD_TOKEN + name)
        except BadInput as exc:
            return _Verdict(problem=str(exc))

    def _read(self, value: str, kind: str) -> bytes:
        if kind == "object":
            try:
                return read_object(value, self._options, MAX_INPUT_BYTES)
            except FileNotFoundError:
                raise BadInput(f"object {value} does not exist") from None
            except ObjectTooLarge as exc:
                raise BadInput(
                    f"is {exc.size / 1e6:.1f} MB; the provider takes at most 20 MB"
                ) from None
            except OSError as exc:
                raise BadInput(f"object {value} cannot be read ({exc})") from None
        path = Path(unquote(urlsplit(value).path)) if value.startswith("file:") else Path(value)
        path = path.expanduser()
        if not path.is_absolute():
            path = self._base_dir / path
        try:
            size = path.stat().st_size
            if size > MAX_INPUT_BYTES:
                raise BadInput(f"is {size / 1e6:.1f} MB; the provider takes at most 20 MB")
            return path.read_bytes()
        except FileNotFoundError:
            raise BadInput(f"file {path} does not exist") from None
        except IsADirectoryError:
            raise BadInput(f"{path} is a folder, not an image file") from None
        except OSError as exc:
            raise BadInput(f"file {path} cannot be read ({exc.strerror})") from None

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                timeout=httpx.Timeout(15.0, connect=10.0),
                follow_redirects=True,
                trust_env=True,
                verify=tls_context(),
                limits=httpx.Limits(max_connections=self._concurrency),
            )
        return self._http

    def _settle(self, item: JobSpec) -> JobSpec | Rejected:
        inputs = dict(item.inputs)
        problems = []
        for field in IMAGE_FIELDS:
            verdict = self._verdicts.get(str(inputs.get(field)))
            if verdict is None:
                continue
            if verdict.problem is not None:
                column = self._columns.get(field)
                where = f" (column {column!r})" if column else ""
                problems.append(f"{field}{where}: {verdict.problem}")
            elif verdict.token is not None:
                inputs[field] = verdict.token
        if problems:
            reason = f"row {item.row_number}: " + "; ".join(problems)
            return Rejected(item.job_id, item.row_number, item.record, reason)
        if inputs == item.inputs:
            return item
        return replace(item, inputs=inputs, fingerprint=fingerprint(self._model, inputs))


_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WEBP"),
)


def _sniff(head: bytes) -> str | None:
    """An image format from a file's first bytes (its magic number), or None."""
    for magic, offset, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return None


def probe_url(http: httpx.Client, url: str) -> None:
    """Check that a public input is reachable, an image the provider takes and at most 20 MB:
    a HEAD, then a ranged GET of its first bytes when the HEAD does not settle it."""
    try:
        answer = http.head(url)
        size = answer.headers.get("content-length", "")
        kind = answer.headers.get("content-type", "").split(";")[0].strip().lower()
        if answer.status_code in (403, 405, 501) or (answer.is_success and kind in _VAGUE):
            answer, head = _first_bytes(http, url)
            size = answer.headers.get("content-range", "").rpartition("/")[2] or size
            sniffed = _sniff(head) if answer.is_success else None
            kind = f"image/{sniffed.lower()}" if sniffed else kind
    except httpx.HTTPError as exc:
        raise BadInput(f"{url} could not be reached ({type(exc).__name__})") from None
    if not answer.is_success:
        raise BadInput(f"{url} answered HTTP {answer.status_code}")
    if not kind.startswith("image/"):
        raise BadInput(f"{url} is {kind or 'of no stated type'}, not an image")
    if kind.removeprefix("image/") not in (*IMAGE_EXTENSIONS, "x-ms-bmp"):
        raise BadInput(f"{url} is {kind}; the provider takes {_TAKES}")
    if size.isdigit() and int(size) > MAX_INPUT_BYTES:
        raise BadInput(f"{url} is {int(size) / 1e6:.1f} MB; the provider takes at most 20 MB")


_VAGUE = ("", "application/octet-stream", "binary/octet-stream")


def _first_bytes(http: httpx.Client, url: str) -> tuple[httpx.Response, bytes]:
    with http.stream("GET", url, headers={"Range": "bytes=0-31"}) as answer:
        head = b""
        for chunk in answer.iter_bytes():
            head += chunk
            if len(head) >= 32:
                break
    return answer, head[:32]


def open_uploads(
    url: str | None, options: dict[str, str], lifetime_s: float, *, dry: bool = False
) -> Uploads | None:
    if url is None:
        return None
    if input_kind(url) != "object":
        raise ConfigError(
            f"assets.upload_to {url!r} must be an object-storage URL (s3://, gs:// or az://): "
            "the provider fetches inputs over HTTPS, which a local folder cannot give"
        )
    return Uploads(url, options, lifetime_s, dry=dry)
