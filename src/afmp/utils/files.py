"""Every file afmp writes goes through here: written to a temporary name, then renamed.

A reader (or a crash) sees the old file or the new one, never a part. JSON is strict
(NaN and infinities as null); CSV tables take their columns from the rows or a list;
figures are PNG.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in the same folder, flush it to disk, then
    rename it onto ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _strict(obj):
    """``obj`` with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (NaN and infinities written as null), atomically."""
    text = json.dumps(_strict(obj), indent=2, default=str, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> Path:
    """A CSV table of ``rows``: the ``columns`` given (others in a row are left out), or the first row's keys."""
    columns = list(columns if columns is not None else rows[0] if rows else [])

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def write_table(out: str | os.PathLike, stem: str, rows: list[dict], columns: list[str]) -> None:
    """``out/stem.csv`` (those columns) and ``out/stem.json`` (every key; NaN as null)."""
    write_csv(Path(out) / f"{stem}.csv", rows, columns)
    write_json(Path(out) / f"{stem}.json", rows)


def save_png(fig, path: str | os.PathLike, dpi: int = 120, **savefig) -> Path:
    """A matplotlib figure as a PNG file (``savefig`` options such as bbox_inches pass through)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, **savefig))
