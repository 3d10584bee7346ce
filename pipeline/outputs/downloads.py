"""The edited images: each output of a succeeded job downloaded, checked and stored.

Downloads run beside the workers with their own HTTP client and concurrency, so an image never
holds a provider slot. An image is streamed with a size cap, must decode as an image (format,
width, height), is named after its row, its job id's hash and its index (never after text from
the manifest or the provider), content-hashed, and written under a temporary name then renamed.
A download that fails never loses the prediction: the image stays `failed` (or `pending`) in the
journal, and the next run of the same command fetches it without creating anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import random
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import httpx
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.core import (
    MAX_INPUT_BYTES,
    AssetsSection,
    ConfigError,
    DownloadStats,
    ObjectStore,
    PriorSuccess,
    ThumbSink,
    file_sha256,
    input_thumb,
    located,
    output_thumb,
    sample_address,
    tls_context,
)
from pipeline.journal import Commits, FailImage, Journal, StoreImage

__all__ = [
    "CopyCheck",
    "Downloader",
    "FolderStore",
    "ObjectStore",
    "inspect_image",
    "open_store",
    "recheck_copies",
]

_log = structlog.get_logger("pipeline.outputs.downloads")
_PROBE = ".wanbatch-probe"  # written and deleted by a store's check
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class Store(Protocol):
    """Where the images are kept."""

    def check(self) -> None:
        """ConfigError when the store cannot be used: called before anything is sent."""
        ...

    def put(self, name: str, data: bytes) -> str:
        """Write `name` whole (never half) and say where it is: a path or a URL."""
        ...


class FolderStore:
    """A local folder; files are written under a temporary name, synced, then renamed."""

    def __init__(self, folder: Path, run_dir: Path) -> None:
        self._folder = folder
        self._run_dir = run_dir

    def check(self) -> None:
        """Made if missing, then a probe file written, synced and deleted: a folder that
        exists but cannot be written (read-only, full, /proc) fails here, before any money."""
        try:
            self._folder.mkdir(parents=True, exist_ok=True)
            self.put(_PROBE, b"wanbatch store probe")
            (self._folder / _PROBE).unlink()
        except OSError as exc:
            raise ConfigError(
                f"assets.store {self._folder} cannot be used: {exc.strerror or exc}"
            ) from None

    def put(self, name: str, data: bytes) -> str:
        path = self._folder / name
        if path.is_file() and file_sha256(path) != hashlib.sha256(data).hexdigest():
            # names are unique by construction: a file there that is not this image is
            # another's, and is never silently replaced
            raise OSError(f"{path} holds another image; it is not overwritten")
        tmp = path.with_name(f".{name}.tmp")
        try:
            with tmp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # gone once renamed; a failed write leaves nothing
        return str(path.relative_to(self._run_dir) if path.is_relative_to(self._run_dir) else path)


def open_store(section: AssetsSection, run_dir: Path) -> Store:
    if "://" in section.store:
        return ObjectStore(section.store, section.storage_options)
    return FolderStore(Path(section.store), run_dir)


def recheck_copies(journal: Journal, copies: CopyCheck, run_dir: Path) -> None:
    """A resume counts a stored image only if its copy is still there (someone may have
    cleared the folder or the bucket): the ones gone are fetched again."""
    gone: list[tuple[int, int]] = []
    for batch in journal.reports.stored_copies():
        where = {(row, idx): located(p, run_dir) for row, idx, p in batch}
        missing = copies.gone(list(set(where.values())))
        gone += [image for image, p in where.items() if p in missing]
    if gone:
        journal.reports.unstore(gone)
        _log.warning("stored_images_missing", images=len(gone), hint="fetched again")


def image_name(stem: str, index: int, extension: str) -> str:
    """A stored image's name, after the product: the row's id made safe for a file name (at
    most 80 of its letters, digits, `.`, `_` and `-`; anything else becomes `_`), `-redoN`
    for an edit made again after N rejections, 64 bits of the hash of the whole stem
    (`N:prediction:id`, see `journal.rows.stem`: two ids that read alike, an id that reads
    like another's remake, or the same row's edit of another run, stay apart, and no pair that
    meets can be searched for), and the output's index.
    Never a path from the manifest or the provider taken as is."""
    count, _, rest = stem.partition(":")
    job_id = rest.partition(":")[2]
    shown = f"{job_id}-redo{count}" if count not in ("", "0") else job_id
    safe = _UNSAFE_NAME.sub("_", shown)[:80].strip("._") or "row"
    ident = hashlib.sha256(stem.encode()).hexdigest()[:16]
    return f"{safe}-{ident}-{index}.{extension}"


class CopyCheck:
    """Whether the stored copies an earlier run made of its outputs are still there: a local
    file, or an object (one HEAD each, a few at a time)."""

    def __init__(self, options: dict[str, str]) -> None:
        self._options = options
        self._buckets: dict[str, ObjectStore] = {}

    def present(self, prior: dict[str, PriorSuccess]) -> dict[str, PriorSuccess]:
        """`prior` with each copy that is gone (or cannot be looked up) dropped, so that its
        image is fetched again."""
        wanted = list({c.path for p in prior.values() for c in p.copies if c is not None})
        if not wanted:
            return prior
        gone = self.gone(wanted)
        return {
            fp: replace(
                p,
                copies=tuple(c if c is not None and c.path not in gone else None for c in p.copies),
            )
            for fp, p in prior.items()
        }

    def gone(self, paths: list[str]) -> set[str]:
        """Which of these stored copies (absolute paths or object URLs) are not there."""
        if not paths:
            return set()
        with ThreadPoolExecutor(8, thread_name_prefix="copies") as pool:
            return {
                p for p, there in zip(paths, pool.map(self._there, paths), strict=True) if not there
            }

    def _there(self, path: str) -> bool:
        if "://" not in path:
            return Path(path).is_file()
        scheme, _, rest = path.partition("://")
        bucket, _, key = rest.partition("/")
        base = f"{scheme}://{bucket}"
        try:
            if base not in self._buckets:
                self._buckets[base] = ObjectStore(base, self._options)
            return self._buckets[base].exists(key)
        except (ConfigError, OSError):
            return False


_INPUT_GRACE_S = 5.0  # the inputs' thumbnails still queued get this long once outputs are in


class BadImage(Exception):
    """What was downloaded is not an image we keep: too large, cut short, or not decodable."""


@dataclass(frozen=True, slots=True)
class _Job:
    row_number: int
    job_id: str
    index: int
    url: str


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """The format, width and height of a whole, decodable image; BadImage otherwise."""
    from PIL import Image, UnidentifiedImageError  # the run loads Pillow only to check images

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: a cut-short file fails here
            return str(image.format), image.width, image.height
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"not a whole image ({exc})") from None


class Downloader:
    """`submit()` the outputs of succeeded jobs; `run()` stores them until `close()` and the
    queue is drained."""

    def __init__(
        self,
        section: AssetsSection,
        store: Store,
        journal: Commits,
        thumbs: ThumbSink | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        stats: DownloadStats | None = None,
        samples_from: str | None = None,
    ) -> None:
        self._transport = transport  # tests hand one in; the network otherwise
        self._thumbs = thumbs  # the report's thumbnails are made here, when given
        self.samples_from = samples_from  # the embedded sandbox's root, for its samples
        self._inputs_seen: OrderedDict[str, None] = OrderedDict()  # inputs thumbnailed
        self._section = section
        self._store = store
        self._journal = journal
        self._http: httpx.AsyncClient | None = None  # made by run()
        send, receive = anyio.create_memory_object_stream[_Job](math.inf)
        self._send: MemoryObjectSendStream[_Job] = send
        self._receive: MemoryObjectReceiveStream[_Job] = receive
        inputs, taken = anyio.create_memory_object_stream[str](math.inf)
        self._inputs_send: MemoryObjectSendStream[str] = inputs
        self._inputs_receive: MemoryObjectReceiveStream[str] = taken
        self._dead_hosts: set[str] = set()  # inputs' hosts that could not be reached
        self.stats = stats if stats is not None else DownloadStats()

    def submit(self, row_number: int, job_id: str, urls: tuple[str, ...] | list[str]) -> None:
        for index, url in enumerate(urls):
            self._send.send_nowait(_Job(row_number, job_id, index, url))

    def submit_input(self, url: str) -> None:
        """A job's public input, fetched once for the report's thumbnail (best effort)."""
        if not self._section.input_thumbnails or self._thumbs is None:
            return
        if url in self._inputs_seen or "://" not in url:
            return
        self._inputs_seen[url] = None
        if len(self._inputs_seen) > 50_000:
            self._inputs_seen.popitem(last=False)
        with contextlib.suppress(anyio.ClosedResourceError):
            self._inputs_send.send_nowait(url)

    def submit_many(self, images: list[tuple[int, str, int, str]]) -> None:
        """Images (row, job id, index, URL) to fetch; once the run stops taking them, they
        stay pending in the journal, for the next run."""
        for row_number, job_id, index, url in images:
            try:
                self._send.send_nowait(_Job(row_number, job_id, index, url))
            except anyio.ClosedResourceError:
                return

    def close(self) -> None:
        """No more submissions: `run()` returns once what is queued is stored (or failed)."""
        self._send.close()

    async def run(self, pending: list[tuple[int, str, int, str]]) -> None:
        """Store `pending` (left by an earlier run) and whatever is submitted; the store was
        checked before anything was sent."""
        self.submit_many(pending)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(60.0, connect=10.0),
            # a connection for each output consumer and the inputs' one: no request waits in
            # the pool's queue, where a cancel (a download's deadline) could leak its slot
            limits=httpx.Limits(max_connections=self._section.concurrency + 1),
            follow_redirects=True,
            trust_env=True,
            verify=tls_context(),
            transport=self._transport,
        )
        try:
            async with anyio.create_task_group() as tg:
                # the report's input thumbnails: best effort, one at a time, and dropped
                # once the outputs are stored, so they never hold the run's end
                inputs_done = anyio.Event()
                tg.start_soon(self._consume_inputs, inputs_done)
                async with anyio.create_task_group() as outputs:
                    for _ in range(self._section.concurrency):
                        outputs.start_soon(self._consume, self._receive.clone())
                self._inputs_send.close()
                with anyio.move_on_after(_INPUT_GRACE_S):  # what is queued, if it is quick
                    await inputs_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self.discard()
            with anyio.CancelScope(shield=True):
                await self._http.aclose()

    def discard(self) -> None:
        """Drop what is still queued (the run stops here): those images stay pending in the
        journal, for the next run."""
        self._send.close()
        self._receive.close()
        self._inputs_send.close()

    async def _consume_inputs(self, done: anyio.Event) -> None:
        try:
            async with self._inputs_receive:
                async for url in self._inputs_receive:
                    await self._fetch_input(url)
        finally:
            done.set()

    async def _consume(self, receive: MemoryObjectReceiveStream[_Job]) -> None:
        async with receive:
            async for job in receive:
                await self._fetch(job)

    async def _fetch(self, job: _Job) -> None:
        error = ""
        limit = self._section.download_timeout_s
        for attempt in range(1, self._section.attempts + 1):
            try:
                with anyio.fail_after(limit):  # never queued for the pool: see run()
                    data = await self._download(job.url)
                stored = await anyio.to_thread.run_sync(self._keep, job, data)
            except TimeoutError:
                error = f"the download took over {limit:g} s (assets.download_timeout_s)"
                break  # a server that slow now is tried again by the next run, not this one
            except (httpx.HTTPError, BadImage, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                if attempt < self._section.attempts:
                    await anyio.sleep(random.uniform(0.05, 0.2) * 2**attempt)
                continue
            await self._journal.write(stored)
            self.stats.stored += 1
            self.stats.bytes += stored.size
            return
        self.stats.failed += 1
        _log.warning("image_failed", job_id=job.job_id, index=job.index, error=error)
        await self._journal.write(FailImage(job.row_number, job.index, error))

    async def _download(self, url: str, limit: int | None = None) -> bytes:
        limit = limit or self._section.max_bytes
        assert self._http is not None
        async with self._http.stream("GET", url) as answer:
            answer.raise_for_status()
            declared = answer.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BadImage(f"{int(declared):,} bytes; the limit is {limit:,}")
            data = bytearray()
            async for chunk in answer.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    raise BadImage(f"over {limit:,} bytes (assets.max_bytes)")
            # a compressed answer's length is not the image's: Pillow judges those alone
            encoded = "content-encoding" in answer.headers
            if declared.isdigit() and not encoded and len(data) != int(declared):
                raise BadImage(f"cut short: {len(data):,} of {int(declared):,} bytes")
        return bytes(data)

    async def _fetch_input(self, url: str) -> None:
        assert self._thumbs is not None
        parts = urlsplit(url)
        where = sample_address(url, self.samples_from)  # the sandbox serves the demo's samples
        if where is None and parts.netloc in self._dead_hosts:
            return
        try:
            with anyio.fail_after(10):
                data = await self._download(where or url, MAX_INPUT_BYTES)
            await anyio.to_thread.run_sync(self._thumbs.put, input_thumb(url), data)
        except (httpx.TransportError, TimeoutError):
            self._dead_hosts.add(parts.netloc)  # one try per unreachable host, not per row
        except (httpx.HTTPError, BadImage, OSError, ValueError, OverflowError) as exc:
            # a port out of range is OverflowError in the socket layer: a preview missed, not
            # the run's end
            _log.debug("input_thumbnail_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    def _keep(self, job: _Job, data: bytes) -> StoreImage:
        """Check and write one image (in a thread), under a name of our own."""
        kind, width, height = inspect_image(data)
        name = image_name(job.job_id, job.index, _EXTENSIONS.get(kind, "img"))
        where = self._store.put(name, data)
        if self._thumbs is not None:
            with contextlib.suppress(OSError, ValueError):
                self._thumbs.put(output_thumb(job.row_number, job.index), data)
        digest = hashlib.sha256(data).hexdigest()
        return StoreImage(job.row_number, job.index, where, digest, len(data), width, height, kind)
