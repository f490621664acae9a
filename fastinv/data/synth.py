"""The synthetic factor dataset: anti-aliased shapes whose nuisance factors are known.

The class is the shape; everything else (colours, background texture, position, scale,
rotation) is drawn independently per image and written to ``factors.csv``, so an analysis can
ask which of these factors a classifier's logits still carry.

Layout written by :func:`make_synthetic_dataset`::

    out/train/<class_name>/<id>.jpg
    out/val/<class_name>/<id>.jpg
    out/factors.csv        path (relative to out), split, class, class_name, factors...

Rows of ``factors.csv`` are in the loader's index order: the train rows first, in the sorted
file order that ``make_loader(out / "train", train=False)`` uses, then the val rows likewise.
So ``load_factors(out, split="train")`` row ``i`` describes the sample with ``index == i``.

Rendering: the shape's coverage mask is drawn with PIL at 4x and box-downsampled (anti-aliasing
by supersampling), then composited: ``pixel = a * fg + (1 - a) * background`` (PIL, in C). Every
shape is centred on its area centroid, so the measured centroid of the mask is ``(x, y)``.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from fastinv.io import atomic_open, atomic_write_bytes

# Sorted, so that the class index equals the ImageFolder label (class folders sort by name).
CLASS_NAMES = tuple(sorted((
    "circle", "ring", "ellipse", "triangle", "square",
    "pentagon", "hexagon", "star", "cross", "heart",
)))
TEXTURES = ("flat", "stripes", "checker")
FACTOR_COLUMNS = (
    "fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b", "texture",
    "x", "y", "scale", "rotation",
)
"""Factors: colours in [0, 1]; texture is an index into TEXTURES; x, y are the shape centre as a
fraction of the image width / height (0 = left / top); scale is the shape's outer radius as a
fraction of the image side; rotation in degrees, counter-clockwise (circle and ring ignore it)."""

SUPERSAMPLE = 4
MIN_COLOUR_DISTANCE = 0.35  # fg/bg are redrawn until this far apart (L2 in RGB [0,1]) so the shape is visible
TEXTURE_CONTRAST = 0.25  # stripes/checker darken the background by this fraction in alternate cells


def _unit_polygon(name: str) -> np.ndarray:
    """Vertices (K, 2) of the shape with outer radius 1, centred on its area centroid."""
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    if name in ("circle", "ring"):
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "ellipse":
        pts = np.stack([np.cos(t), 0.5 * np.sin(t)], 1)
    elif name in ("triangle", "square", "pentagon", "hexagon"):
        k = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[name]
        a = np.pi / 2 + 2 * np.pi * np.arange(k) / k
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif name == "star":
        a = np.pi / 2 + np.pi * np.arange(10) / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif name == "cross":
        w = 0.33
        pts = np.array([[w, 1], [w, w], [1, w], [1, -w], [w, -w], [w, -1],
                        [-w, -1], [-w, -w], [-1, -w], [-1, w], [-w, w], [-w, 1]], float)
        pts /= np.sqrt(1 + w * w)
    elif name == "heart":
        s = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
        pts = np.stack([16 * np.sin(s) ** 3,
                        13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s)], 1)
    else:
        raise ValueError(f"unknown shape {name!r}; choose one of {CLASS_NAMES}")
    # centre on the polygon's area centroid (shoelace), then scale to outer radius 1
    x, y = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    cx = ((x + x1) * cross).sum() / (6 * area)
    cy = ((y + y1) * cross).sum() / (6 * area)
    pts = pts - [cx, cy]
    return pts / np.sqrt((pts**2).sum(1)).max()


_POLYGONS = {name: _unit_polygon(name) for name in CLASS_NAMES}
RING_INNER = 0.55  # inner radius of the ring, relative to its outer radius


def draw_factors(n: int, seed: int, num_classes: int = 10) -> dict[str, np.ndarray]:
    """Draw the class and every factor for ``n`` images, independently (vectorised, deterministic)."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, num_classes, n)
    fg = rng.random((n, 3))
    bg = rng.random((n, 3))
    close = np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE
    while close.any():  # rejection keeps the shape visible; everything else stays independent
        fg[close] = rng.random((int(close.sum()), 3))
        close = np.linalg.norm(fg - bg, axis=1) < MIN_COLOUR_DISTANCE
    return {
        "class": cls.astype(np.int64),
        "fg_r": fg[:, 0], "fg_g": fg[:, 1], "fg_b": fg[:, 2],
        "bg_r": bg[:, 0], "bg_g": bg[:, 1], "bg_b": bg[:, 2],
        "texture": rng.integers(0, len(TEXTURES), n).astype(np.int64),
        # Shapes 16-24 px across at 32 px (centre +- scale stays inside [0.02, 0.98]). At 8-18 px
        # (outer radius 0.12-0.28, centre in [0.3, 0.7], until 2026-12-05) the judge reads 0.98
        # of the real images, but generators did not learn outlines it can read in the demo's
        # budget: the demo-cpu inverter 0.35 at 2,000 steps (0.63 at these sizes), a decoder
        # told every factor drew blobs (0.12 at 20,000 steps): benchmarks/RESULTS.md round 12.
        "x": rng.uniform(0.4, 0.6, n),
        "y": rng.uniform(0.4, 0.6, n),
        "scale": rng.uniform(0.25, 0.38, n),
        "rotation": rng.uniform(0.0, 360.0, n),
    }


def render(factors: dict[str, float], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (H, W, 3) uint8 and its coverage mask (H, W) float32 in [0, 1]."""
    image, mask = _render_pil(factors, resolution)
    return np.asarray(image), np.asarray(mask, dtype=np.float32) / 255.0


def _colour(factors, prefix: str) -> tuple[int, int, int]:
    return tuple(int(factors[f"{prefix}_{c}"] * 255.0 + 0.5) for c in "rgb")


def _render_pil(factors: dict[str, float], resolution: int) -> tuple[Image.Image, Image.Image]:
    """The image (RGB) and the coverage mask (L); all pixel work runs in PIL's C code."""
    name = CLASS_NAMES[int(factors["class"])]
    big = resolution * SUPERSAMPLE
    cx, cy = factors["x"] * big, factors["y"] * big
    radius = factors["scale"] * big
    theta = np.deg2rad(factors["rotation"])
    c, s = np.cos(theta), np.sin(theta)
    unit = _POLYGONS[name]
    # image y grows downwards: minus sign so that rotation is counter-clockwise on screen
    px = radius * (unit[:, 0] * c - unit[:, 1] * s)
    py = radius * (unit[:, 0] * s + unit[:, 1] * c)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(list(zip((cx + px).tolist(), (cy - py).tolist())), fill=255)
    if name == "ring":
        draw.polygon(list(zip((cx + RING_INNER * px).tolist(), (cy - RING_INNER * py).tolist())),
                     fill=0)
    mask = mask.reduce(SUPERSAMPLE)  # box filter over 4x4 samples: the anti-aliasing

    size = (resolution, resolution)
    background = Image.new("RGB", size, _colour(factors, "bg"))
    texture = int(factors["texture"])
    if TEXTURES[texture] != "flat":
        background = ImageChops.multiply(background, _texture(texture, resolution))
    image = Image.composite(Image.new("RGB", size, _colour(factors, "fg")), background, mask)
    return image, mask


@functools.lru_cache(maxsize=16)
def _texture(texture: int, resolution: int) -> Image.Image:
    """Multiplicative background texture: white, and (1 - TEXTURE_CONTRAST) in alternate cells."""
    i = np.arange(resolution)
    period = max(resolution // 8, 2)
    if TEXTURES[texture] == "stripes":
        cells = ((i[:, None] + i[None, :]) // period) % 2
    else:
        cells = (i[:, None] // period + i[None, :] // period) % 2
    level = np.round(255 * (1.0 - TEXTURE_CONTRAST * cells)).astype(np.uint8)
    return Image.fromarray(np.repeat(level[..., None], 3, axis=2))


def _write(path: str, data: bytes) -> None:
    # renamed into place (a killed run leaves no truncated JPEG under a real name); no fsync
    # per image: it would cost more than the dataset's writes
    atomic_write_bytes(path, data, fsync=False)


def _render_chunk(job: tuple[list[dict], list[str], int, int]) -> int:
    rows, paths, resolution, quality = job
    # Creating files is latency-bound on some filesystems: overlap it with rendering in threads.
    with ThreadPoolExecutor(4) as io_pool:
        writes = []
        for row, path in zip(rows, paths):
            image, _ = _render_pil(row, resolution)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality, subsampling=0)
            writes.append(io_pool.submit(_write, path, buf.getvalue()))
        for w in writes:
            w.result()  # re-raise a failed write (disk full, permissions) here
    return len(rows)


def make_synthetic_dataset(
    out: str | os.PathLike,
    *,
    n: int = 20000,
    resolution: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
    num_classes: int = 10,
    workers: int | None = None,
    quality: int = 95,
) -> Path:
    """Write the synthetic factor dataset to ``out`` (see the module docstring); returns ``out``.

    Deterministic given ``seed`` (the files and factors.csv are identical on every run and for
    any ``workers``). The first ``n - round(n * val_fraction)`` draws form the train split.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if (out / "factors.csv").exists() or (out / "train").exists():
        raise FileExistsError(f"{out} already holds a dataset; choose a new --out or delete it first")
    f = draw_factors(n, seed, num_classes)
    n_val = int(round(n * val_fraction))
    split = np.array(["train"] * (n - n_val) + ["val"] * n_val)
    width = len(str(n - 1))
    rel = [f"{split[i]}/{CLASS_NAMES[f['class'][i]]}/{i:0{width}d}.jpg" for i in range(n)]
    for sp in ("train", "val") if n_val else ("train",):
        for name in CLASS_NAMES[:num_classes]:
            (out / sp / name).mkdir(parents=True, exist_ok=True)

    keys = ("class", *FACTOR_COLUMNS)
    rows = [{k: f[k][i].item() for k in keys} for i in range(n)]
    workers = workers or min(os.cpu_count() or 1, 8)
    chunk = max(64, math.ceil(n / (workers * 8)))
    jobs = [(rows[a:a + chunk], [str(out / p) for p in rel[a:a + chunk]], resolution, quality)
            for a in range(0, n, chunk)]
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _render_chunk(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_chunk, jobs))

    # loader index order: split, then ImageFolder order (class name, then file name)
    order = sorted(range(n), key=lambda i: (split[i] != "train", CLASS_NAMES[f["class"][i]], rel[i]))
    with atomic_open(out / "factors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "split", "class", "class_name", *FACTOR_COLUMNS])
        for i in order:
            w.writerow([rel[i], split[i], int(f["class"][i]), CLASS_NAMES[f["class"][i]],
                        *(_fmt(f[k][i]) for k in FACTOR_COLUMNS)])
    return out


def _fmt(v) -> str:
    return str(int(v)) if isinstance(v, (np.integer, int)) else f"{float(v):.6f}"


_INT_COLUMNS = {"class", "texture"}
_STR_COLUMNS = {"path", "split", "class_name"}


def load_factors(root: str | os.PathLike, split: str | None = None) -> dict[str, np.ndarray]:
    """Read ``root/factors.csv`` into a dict of numpy arrays (one per column).

    ``split="train"`` / ``"val"`` keeps that split's rows; row ``i`` is then the sample with
    ``index == i`` from ``make_loader(root / split, ...)``. Strings stay ``str`` arrays,
    ``class`` and ``texture`` are int64, the other factors float64.
    """
    path = Path(root) / "factors.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; pass the directory written by `fastinv data synth --out DIR`"
        )
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for r in reader if split is None or r[1] == split]
    if split is not None and not rows:
        raise ValueError(f"{path} has no rows with split={split!r}")
    cols = list(zip(*rows)) if rows else [()] * len(header)
    result: dict[str, np.ndarray] = {}
    for name, values in zip(header, cols):
        if name in _STR_COLUMNS:
            result[name] = np.array(values, dtype=str)
        elif name in _INT_COLUMNS:
            result[name] = np.array(values, dtype=np.int64)
        else:
            result[name] = np.array(values, dtype=np.float64)
    return result
