"""A cache of scan results, so a large dataset's headers are read once, not on every run and
every rank. Keyed by the dataset root and the validation mode; an entry is used only if the
file list and every file's size and modification time are unchanged.

Location: ``$FASTINV_CACHE_DIR/scans`` (default ``~/.cache/fastinv/scans``). Written
atomically (temp file + rename), so ranks scanning at the same time cannot corrupt it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from fastinv.io import atomic_write

log = logging.getLogger("fastinv.data")

Result = tuple[tuple[int, int] | None, str | None]


def cache_path(root: Path, validate: str) -> Path:
    base = Path(os.environ.get("FASTINV_CACHE_DIR") or Path.home() / ".cache" / "fastinv")
    key = hashlib.sha1(f"{Path(root).resolve()}\0{validate}".encode()).hexdigest()[:20]
    return base / "scans" / f"{key}.npz"


def load(root: Path, validate: str, paths: list[str], stats: np.ndarray) -> list[Result] | None:
    """The cached results for exactly these files with these (size, mtime), else None."""
    path = cache_path(root, validate)
    try:
        with np.load(path, allow_pickle=False) as z:
            if (z["paths"].shape[0] != len(paths) or not np.array_equal(z["stats"], stats)
                    or z["paths"].tolist() != paths):
                return None
            sizes, reasons = z["sizes"], z["reasons"].tolist()
    except (OSError, KeyError, ValueError):
        return None
    return [(None, r) if r else ((int(w), int(h)), None) for (w, h), r in zip(sizes, reasons)]


def save(root: Path, validate: str, paths: list[str], stats: np.ndarray,
         results: list[Result]) -> None:
    path = cache_path(root, validate)
    sizes = np.array([s if s is not None else (-1, -1) for s, _ in results], np.int64)
    reasons = np.array([r or "" for _, r in results], dtype=str)
    try:
        atomic_write(path, lambda fh: np.savez(fh, paths=np.array(paths, dtype=str), stats=stats,
                                                sizes=sizes.reshape(-1, 2), reasons=reasons))
    except OSError as exc:  # a cache is an optimisation: never fail the scan for it
        log.debug("could not write the scan cache %s: %s", path, exc)
