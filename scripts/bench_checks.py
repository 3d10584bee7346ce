"""The automatic checks' CPU per edit, at the provider's real sizes: 2K (2048 px) and 1K edits
made by the sandbox from each sample input (good ones, and each fault a marketplace refuses),
measured as a run measures them: the edit read from its JPEG bytes (a reduced-scale decode),
every generic rule, the amazon_main preset and the product's preservation against its input
(whose working copy a run keeps once per URL, so it is made once here too).

    python scripts/bench_checks.py [--images N]

Prints the CPU milliseconds per image (process time: all threads), mean, median and 95th
percentile: 2K edits with a photo's grain (JPEGs of a real photo's size), the sandbox's flat
2K edits, and 1K ones. The goal: under 20 ms per 2K image.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from pipeline.checks import judge, measure, picture
from pipeline.core import EDIT_FAULTS, ChecksSection
from pipeline.sandbox.images import SAMPLES, render_output, sample_image, target_size


def _grainy(edit: bytes) -> bytes:
    """The edit with a photo's grain: a JPEG of a real photo's size (1-3 MB at 2K), whose
    decode costs what a real one does."""
    with Image.open(io.BytesIO(edit)) as image:
        noise = Image.effect_noise(image.size, 40).convert("RGB")
        grainy = Image.blend(image.convert("RGB"), noise, 0.12)
    out = io.BytesIO()
    grainy.save(out, format="JPEG", quality=92)
    return out.getvalue()


def _edits(size: str, count: int, grain: bool) -> list[tuple[bytes, bytes]]:
    """(edit, its input) pairs: every sample, each fault and none, until `count`."""
    pairs = []
    kinds = (None, *EDIT_FAULTS)
    at = 0
    while len(pairs) < count:
        name = sorted(SAMPLES)[at % len(SAMPLES)]
        source = sample_image(name)
        assert source is not None
        encoded = io.BytesIO()
        source.save(encoded, format="PNG")
        shape = target_size(size, source.size, 1.0)
        edit = render_output(source, shape, at, 0, kinds[at % len(kinds)])
        pairs.append((_grainy(edit) if grain else edit, encoded.getvalue()))
        at += 1
    return pairs


def bench(size: str, count: int, grain: bool) -> tuple[list[float], float]:
    """CPU ms of each image's checks, and the edits' mean size in MB."""
    held = ChecksSection(preset="amazon_main").thresholds()
    wanted = {t.name for t in held}
    asked = 2048 if size == "2K" else 1024
    inputs: dict[bytes, object] = {}
    costs = []
    pairs = _edits(size, count, grain)
    for edit, source in pairs:
        if source not in inputs:  # a run keeps each input's working copy once
            inputs[source] = picture(source)
        before = time.process_time()
        judge(held, measure(picture(edit), inputs[source], asked, wanted))  # type: ignore[arg-type]
        costs.append((time.process_time() - before) * 1000)
    return costs, statistics.fmean(len(e) for e, _ in pairs) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    args = parser.parse_args()
    print(f"{'edits':<16}{'images':>7}{'MB each':>9}{'mean ms':>9}{'median ms':>11}{'p95 ms':>8}")
    for size, grain in (("2K", True), ("2K", False), ("1K", True)):
        costs, megabytes = bench(size, args.images, grain)
        costs.sort()
        p95 = costs[min(len(costs) - 1, int(len(costs) * 0.95))]
        label = f"{size} {'photo grain' if grain else 'flat'}"
        print(
            f"{label:<16}{len(costs):>7}{megabytes:>9.2f}{statistics.fmean(costs):>9.2f}"
            f"{statistics.median(costs):>11.2f}{p95:>8.2f}"
        )


if __name__ == "__main__":
    main()
