"""`wanbatch publish RUN_DIR --to DIR|s3://... [--channel NAME]`: the approved edits, as the
catalog names them, into a folder or a bucket a shop or feed reads.

Each approved image is copied as a JPEG named for its product (`<id>.jpg`, then `<id>-2.jpg`
for its second output...), fitted to the channel's size (never enlarged), with the AI tag
(`tagging.py`) written in and read back. A copy that breaks one of the channel's rules
(`pipeline.core.rules`, measured on the copy itself) is not published, and said. The
destination keeps its own record, `published.csv` (each copy's product, name, hashes of the copy
and of the stored original, prediction, cost and checks): a copy whose original and channel are
unchanged, and that is still there, is not copied again, so a second publish copies nothing;
the products in the run's `removed.csv` are retracted from the destination (their copies
deleted, their lines dropped).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checks import judge
from pipeline.core import (
    CHANNELS,
    PRESETS,
    REMOVED,
    RULES,
    ConfigError,
    ObjectStore,
    ObjectTooLarge,
    Threshold,
    from_sheet,
    read_stored,
)
from pipeline.journal import ApprovedImage, reading
from pipeline.outputs.tagging import tagged_jpeg

__all__ = ["PUBLISHED", "PUBLISHED_COLUMNS", "Published", "publish"]

PUBLISHED = "published.csv"
PUBLISHED_COLUMNS = (
    "id",
    "index",
    "destination",
    "sha256",
    "original_sha256",
    "prediction_id",
    "cost_usd",
    "channel",
    "checks",
)
_LARGEST = 2_000_000_000  # assets.max_bytes's ceiling: no stored original is larger
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Published:
    """What a publish did: copies made, copies already there, products retracted, and the
    approved images not published (why, by image)."""

    copied: int = 0
    unchanged: int = 0
    retracted: int = 0
    refused: list[str] = field(default_factory=list)
    record: str = ""


class _Destination:
    """A folder or a bucket (and prefix): read, write whole, look up, delete."""

    def __init__(self, to: str, options: dict[str, str]) -> None:
        self.url = to.rstrip("/")
        self._bucket = ObjectStore(self.url, options, what="--to") if "://" in to else None
        self._folder = None if self._bucket else Path(to)
        if self._folder is not None:
            try:
                self._folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--to {to} cannot be used: {exc.strerror or exc}") from None

    def where(self, name: str) -> str:
        return f"{self.url}/{name}" if self._bucket else str(self._folder_path(name))

    def _folder_path(self, name: str) -> Path:
        assert self._folder is not None
        return self._folder / name

    def read(self, name: str) -> bytes | None:
        try:
            if self._bucket is not None:
                return self._bucket.get(name)
            return self._folder_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        if self._bucket is not None:
            self._bucket.put(name, data)
            return
        path = self._folder_path(name)
        tmp = path.with_name(f".{name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        if self._bucket is not None:
            return self._bucket.exists(name)
        return self._folder_path(name).is_file()

    def delete(self, name: str) -> None:
        if self._bucket is not None:
            self._bucket.delete(name)
        else:
            self._folder_path(name).unlink(missing_ok=True)


def copy_name(product: str, index: int) -> str:
    """A copy's name after its product: `<id>.jpg`, `<id>-2.jpg`, ... An id that is not safe
    as a file name as it is gets its unsafe letters made `_` and its hash added, so two ids
    never share a name."""
    safe = _UNSAFE.sub("_", product)[:100].strip("._") or "product"
    if safe != product:
        safe += "-" + hashlib.sha256(product.encode()).hexdigest()[:8]
    return f"{safe}.jpg" if index == 0 else f"{safe}-{index + 1}.jpg"


def publish(
    run_dir: Path, to: str, channel: str | None, options: dict[str, str] | None = None
) -> Published:
    """Publish the run's approved images to `to`; ConfigError for an unknown channel or a
    destination that cannot be used."""
    if channel is not None and channel not in CHANNELS:
        raise ConfigError(f"--channel {channel}: no such channel; one of {', '.join(CHANNELS)}")
    options = options or {}
    dest = _Destination(to, options)
    record = _read_record(dest)
    done = Published(record=dest.where(PUBLISHED))
    rules = _channel_rules(channel)
    with reading(run_dir) as journal:
        for batch in journal.reviews.approved_images():
            for image in batch:
                line = _publish_one(image, run_dir, dest, channel, rules, record, done, options)
                if line is not None:
                    record[(line["id"], line["index"])] = line
    done.retracted = _retract(run_dir, dest, record, done)
    try:
        _write_record(dest, record)
    except OSError as exc:
        raise ConfigError(f"{done.record} could not be written: {exc}") from None
    return done


def _channel_rules(channel: str | None) -> list[Threshold]:
    preset = PRESETS.get(CHANNELS[channel].preset, {}) if channel else {}
    return [Threshold(name, RULES[name].bound, value) for name, value in preset.items()]


def _publish_one(
    image: ApprovedImage,
    run_dir: Path,
    dest: _Destination,
    channel: str | None,
    rules: list[Threshold],
    record: dict[tuple[str, str], dict[str, str]],
    done: Published,
    options: dict[str, str],
) -> dict[str, str] | None:
    """One approved image copied (or found there already); its record line, or None when
    it is not published."""
    said = f"{image.job_id} output {image.index + 1}"
    if image.path is None or image.sha256 is None:
        done.refused.append(f"{said}: not stored")
        return None
    name = copy_name(image.job_id, image.index)
    kept = record.get((image.job_id, str(image.index)))
    same = kept is not None and kept["original_sha256"] == image.sha256
    if same and kept is not None and kept["channel"] == (channel or "") and dest.exists(name):
        done.unchanged += 1
        return kept
    from PIL import Image  # loaded by a publish, not by every import of the outputs

    try:
        data = _copy(read_stored(image.path, run_dir, options, _LARGEST), channel)
    except (OSError, ValueError, ObjectTooLarge, Image.DecompressionBombError) as exc:
        done.refused.append(f"{said}: {exc}")
        return None
    if rules:
        from pipeline.checks import measure, picture  # numpy & co., when a channel asks

        wanted = {t.name for t in rules}
        values, failed = judge(rules, measure(picture(data), None, None, wanted))
        if failed:
            broken = ", ".join(f"{n} {values[n]:g}" for n in failed if values[n] is not None)
            done.refused.append(f"{said}: breaks {channel}'s rules ({broken})")
            return None
    try:
        dest.write(name, data)
    except OSError as exc:
        done.refused.append(f"{said}: {dest.where(name)} could not be written ({exc})")
        return None
    done.copied += 1
    return {
        "id": image.job_id,
        "index": str(image.index),
        "destination": dest.where(name),
        "sha256": hashlib.sha256(data).hexdigest(),
        "original_sha256": image.sha256,
        "prediction_id": image.prediction_id or "",
        "cost_usd": f"{image.cost_usd:.6f}",
        "channel": channel or "",
        "checks": ""
        if image.checks_failed is None
        else "passed"
        if not image.checks_failed
        else "failed: " + " ".join(image.checks_failed),
    }


def _copy(original: bytes, channel: str | None) -> bytes:
    """The channel's copy: RGB (transparency flattened on white), fitted, tagged JPEG."""
    from PIL import Image

    spec = CHANNELS[channel] if channel else None
    with Image.open(io.BytesIO(original)) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P"):
            ground = Image.new("RGB", image.size, (255, 255, 255))
            ground.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            rgb = ground
        else:
            rgb = image.convert("RGB")
    if spec is not None and spec.fit is not None:
        rgb.thumbnail((spec.fit, spec.fit), Image.Resampling.LANCZOS)
    return tagged_jpeg(rgb, spec.quality if spec else 92)


def _read_record(dest: _Destination) -> dict[tuple[str, str], dict[str, str]]:
    data = dest.read(PUBLISHED)
    if data is None:
        return {}
    rows = csv.DictReader(io.StringIO(data.decode("utf-8")))
    if rows.fieldnames is None or not set(PUBLISHED_COLUMNS) <= set(rows.fieldnames):
        raise ConfigError(
            f"{dest.where(PUBLISHED)} is not a wanbatch publish record (columns: "
            f"{', '.join(PUBLISHED_COLUMNS)}); publish to another destination"
        )
    return {(r["id"], r["index"]): {c: r[c] for c in PUBLISHED_COLUMNS} for r in rows}


def _write_record(dest: _Destination, record: dict[tuple[str, str], dict[str, str]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, PUBLISHED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(record):
        writer.writerow(record[key])
    dest.write(PUBLISHED, out.getvalue().encode("utf-8"))


def _retract(
    run_dir: Path,
    dest: _Destination,
    record: dict[tuple[str, str], dict[str, str]],
    done: Published,
) -> int:
    """The products `removed.csv` lists, gone from the destination: how many. A copy that
    cannot be deleted keeps its line, and is said."""
    path = run_dir / REMOVED
    if not path.is_file():
        return 0
    with path.open(newline="", encoding="utf-8") as handle:
        gone = {str(from_sheet(row["job_id"])) for row in csv.DictReader(handle)}
    retracted = set()
    for key in [k for k in record if k[0] in gone]:
        where = record[key]["destination"]
        try:
            dest.delete(where.rsplit("/", 1)[-1])
        except OSError as exc:
            done.refused.append(f"{key[0]} (removed from the catalog): {where} stays ({exc})")
            continue
        del record[key]
        retracted.add(key[0])
    return len(retracted)
