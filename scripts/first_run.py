"""A newcomer's first run on each platform's export, timed: `wanbatch init EXPORT`, then
`wanbatch run` of the config it wrote, on the embedded sandbox, each as its own process (as a
person types them). The exports are the ones the tests judge (tests/test_products.py).

    python scripts/first_run.py [--only shopify amazon]

Prints, per export: the platform `init` recognised, the seconds `init` took (with its
estimate), the seconds the first run took, its exit code, and rows sent and skipped. Setting
up a fresh clone (`make setup`) is measured apart: `.ci/run` prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import test_products as exports


def _sheet_export(folder: Path) -> Path:
    return exports._write(folder / "Catalog - Sheet1.csv", exports._sheet())


def _xlsx_export(folder: Path) -> Path:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for n in range(1, 21):
        sheet.append([n, f"Item {n}", f"https://images.example.com/feed/{n}.jpg", 9.5])
    sheet.insert_rows(1)
    for column, name in enumerate(("id", "title", "image_link", "price"), start=1):
        sheet.cell(1, column, name)
    path = folder / "Merchant feed.xlsx"
    book.save(path)
    return path


MEDIA = "https://shop.example.com/media/catalog/product"
EXPORTS: list[tuple[str, Callable[[Path], Path], list[str]]] = [
    ("shopify", lambda f: exports._write(f / "products_export.csv", exports._shopify()), []),
    ("woocommerce", lambda f: exports._write(f / "wc.csv", exports._woocommerce()), []),
    ("amazon", lambda f: exports._write(f / "Flat.File.txt", exports._amazon(), "\t"), []),
    ("magento", lambda f: exports._write(f / "catalog_product.csv", exports._magento()),
     ["--url-base", MEDIA]),
    ("sheets", _sheet_export, []),
    ("spark", lambda f: exports._spark(f / "catalog.parquet"), []),
    ("xlsx", _xlsx_export, []),
]  # fmt: skip


def _timed(command: list[str], folder: Path) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="these exports alone (by name)")
    args = parser.parse_args()
    wanbatch = [sys.executable, "-m", "pipeline"]
    print(f"{'export':<12} {'init s':>7} {'run s':>7} {'exit':>5} {'sent':>5} {'skipped':>8}")
    for name, make, extra in EXPORTS:
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"first-run-{name}-") as tmp:
            folder = Path(tmp)
            export = make(folder)
            init_s, init_code = _timed([*wanbatch, "init", str(export), *extra], folder)
            assert init_code in (0, 6), f"{name}: init exit {init_code}"
            run_s, code = _timed([*wanbatch, "run", "wanbatch.yaml"], folder)
            summaries = list(folder.glob("runs/*/*/summary.json"))
            found = json.loads(summaries[0].read_text()) if summaries else {}
            statuses = found.get("by_status", {})
            print(
                f"{name:<12} {init_s:>7.2f} {run_s:>7.2f} {code:>5} "
                f"{found.get('creates', 0):>5} {statuses.get('skipped', 0):>8}"
            )


if __name__ == "__main__":
    main()
