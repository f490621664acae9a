"""Finding the images of a dataset: an ImageFolder tree or a file list, and the bad files in it.

A dataset is scanned once, before any loader starts: every file's header is read (its size is
needed to plan crops) and checked, so that a corrupt file is reported once, with its path, and
never reaches a decoder in the middle of an epoch. The checks (``validate=``):

- ``"header"`` (default, cheap): PIL can identify the file as JPEG or PNG; a PNG's chunks are
  complete with valid CRCs (``Image.verify``); a JPEG ends with its end-of-image marker (a
  truncated JPEG does not, and libjpeg would otherwise decode it silently as a grey tail).
- ``"decode"``: additionally decode every image fully with PIL (thorough, slow on big data).
- ``"none"``: only read the header (size); decode errors are then caught by the loaders.

Sample order (the dataset ``index``): ImageFolder — classes sorted by name, then files by
relative path within each class (torchvision's order); file list — the list's own order.

Large datasets are scanned with one process per core and the results cached
(fastinv.data.scan_cache), keyed by every file's size and modification time.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastinv.data import scan_cache

log = logging.getLogger("fastinv.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VALIDATE_MODES = ("header", "decode", "none")
_JPEG_EOI = b"\xff\xd9"
# A scan reads every file's header: 6,800 PNGs in 1.0 s, 0.24-0.26 s from the cache (measured,
# RESULTS.md Demo round 27); `fastinv demo --quick` opens its 6,800 training images seven times
# (3 classifiers, 2 inverters, evaluation), six of them now from the cache
CACHE_MIN_FILES = 4_000
PROCESS_SCAN_MIN_FILES = 20_000
_JPEG_TAIL = 4096  # bytes searched for the end-of-image marker (some writers pad after it)


@dataclass(frozen=True)
class BadFile:
    path: str
    reason: str


@dataclass
class BadFileReport:
    """Files that were skipped: found at scan time or when a loader failed to decode them."""

    entries: list[BadFile] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.entries)

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, path: str, reason: str) -> bool:
        """Record a bad file; log it the first time it is seen. Returns True if new."""
        if any(e.path == path for e in self.entries):
            return False
        self.entries.append(BadFile(path, reason))
        log.warning("skipping unreadable image %s (%s)", path, reason)
        return True

    def __str__(self) -> str:
        if not self.entries:
            return "no bad files"
        lines = [f"{self.count} bad file(s) skipped:"]
        lines += [f"  {e.path}: {e.reason}" for e in self.entries]
        return "\n".join(lines)


@dataclass
class Source:
    """The readable images of a dataset, in index order, with their labels and sizes."""

    root: Path
    paths: list[str]  # absolute paths
    labels: np.ndarray  # int64 (N,)
    sizes: np.ndarray  # int64 (N, 2): width, height as stored in the file
    classes: list[str]  # class names, label i -> classes[i]
    bad_files: BadFileReport

    def __len__(self) -> int:
        return len(self.paths)


def dataset_classes(root: str | os.PathLike) -> list[str]:
    """Class names of an ImageFolder tree or a file list, label ``i`` -> ``classes[i]``."""
    _, _, classes = _list_entries(Path(root))
    return classes


def scan_source(root: str | os.PathLike, *, validate: str = "header",
                workers: int | None = None, cache: bool | None = None) -> Source:
    """List, check and measure every image of ``root`` (ImageFolder dir or .txt/.csv list).

    ``cache``: reuse / store the results (fastinv.data.scan_cache); ``None`` caches datasets
    of at least CACHE_MIN_FILES files, where a scan takes long enough to matter."""
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
    root = Path(root)
    paths, labels, classes = _list_entries(root)
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    if cache is None:
        cache = len(paths) >= CACHE_MIN_FILES
    results = None
    if cache:
        with ThreadPoolExecutor(workers) as pool:
            stats = np.array(list(pool.map(_stat, paths)), dtype=np.int64).reshape(-1, 2)
        results = scan_cache.load(root, validate, paths, stats)
    if results is None:
        results = _inspect_all(paths, validate, workers)
        if cache:
            scan_cache.save(root, validate, paths, stats, results)
    report = BadFileReport()
    keep = []
    sizes = []
    for i, (size, error) in enumerate(results):
        if error is None:
            error = _pixel_limit_error(size)  # here, not in _inspect: cached scans get it too
        if error is None:
            keep.append(i)
            sizes.append(size)
        else:
            report.add(paths[i], error)
    if not keep:
        raise ValueError(f"no readable image in {root}: all {len(paths)} files are bad:\n{report}")
    return Source(
        root=root,
        paths=[paths[i] for i in keep],
        labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        classes=classes,
        bad_files=report,
    )


def _list_entries(root: Path) -> tuple[list[str], list[int], list[str]]:
    if not root.exists():
        raise FileNotFoundError(
            f"dataset root {root} does not exist; pass an ImageFolder directory "
            f"(one sub-folder per class) or a .txt/.csv file list"
        )
    if root.is_file():
        return _read_file_list(root)
    return _scan_image_folder(root)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_image_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
        found.sort()
        paths += [os.path.abspath(p) for p in found]
        labels += [label] * len(found)
    if not paths:
        loose = [f for f in os.listdir(root) if _is_image(f)]
        hint = (" (images lie directly in it: put them in one sub-folder per class)" if loose else "")
        raise ValueError(
            f"no .jpg/.jpeg/.png images found in class sub-folders of {root}{hint}; pass an "
            f"ImageFolder directory (ROOT/<class>/<image>) or a .txt/.csv file list"
        )
    return paths, labels, classes


def _read_file_list(path: Path) -> tuple[list[str], list[int], list[str]]:
    """``.csv`` with a header naming ``path`` and ``label`` columns, or ``.txt`` lines
    ``<path> <label>`` (whitespace- or comma-separated). Relative paths are relative to the list's
    folder. Labels are integers, or class names (then sorted names give the integers)."""
    base = path.parent
    with open(path, newline="") as fh:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: a .csv file list needs a header with 'path' and 'label' columns")
            rows = [(r["path"], r["label"]) for r in reader]
        else:
            rows = []
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.replace(",", " ").split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{lineno}: expected '<path> <label>', got {line!r}")
                rows.append((parts[0], parts[1]))
    if not rows:
        raise ValueError(f"file list {path} is empty; it needs one '<path> <label>' line per image")
    raw = [lab.strip() for _, lab in rows]
    if all(_is_int(lab) for lab in raw):
        labels = [int(lab) for lab in raw]
        if min(labels) < 0:
            raise ValueError(f"{path}: labels must be >= 0, found {min(labels)}")
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(raw))
        labels = [classes.index(lab) for lab in raw]
    paths = [os.path.abspath(p if os.path.isabs(p) else base / p) for p, _ in rows]
    return paths, labels, classes


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _inspect_all(paths: list[str], validate: str, workers: int) -> list:
    if len(paths) >= PROCESS_SCAN_MIN_FILES and (os.cpu_count() or 1) > 1:
        # header parsing is Python code that holds the GIL: big scans use every core
        chunks = [paths[i:i + 2000] for i in range(0, len(paths), 2000)]
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            return [r for part in pool.map(_inspect_chunk, chunks, [validate] * len(chunks))
                    for r in part]
    with ThreadPoolExecutor(workers) as pool:  # small scans: threads start instantly
        return list(pool.map(lambda p: _inspect(p, validate), paths))


def _inspect_chunk(paths: list[str], validate: str) -> list:
    return [_inspect(p, validate) for p in paths]


def _pixel_limit_error(size: tuple[int, int]) -> str | None:
    """PIL only warns between its decompression-bomb limit and twice it (and DALI has no
    limit): such a file would be decoded in full, hundreds of MB per image. Skip it."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = size
    if limit and w * h > limit:
        return (f"{w}x{h} = {w * h} pixels exceeds PIL's decompression-bomb limit of {limit} "
                "(raise PIL.Image.MAX_IMAGE_PIXELS if such images are expected)")
    return None


def _inspect(path: str, validate: str) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height), None — or None, the reason the file is unusable."""
    try:
        with Image.open(path) as im:
            size = im.size
            fmt = im.format
            if fmt not in ("JPEG", "PNG"):
                return None, f"unsupported format {fmt} (JPEG and PNG are supported)"
            if validate != "none":
                im.verify()  # PNG: every chunk present with a valid CRC
        if validate != "none" and fmt == "JPEG":
            with open(path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(path) - _JPEG_TAIL))
                if _JPEG_EOI not in fh.read():
                    return None, "truncated JPEG (no end-of-image marker)"
        if validate == "decode":
            with Image.open(path) as im:
                im.load()
        return size, None
    except Exception as exc:  # any failure means: skip this file, say why
        return None, f"{type(exc).__name__}: {exc}"
