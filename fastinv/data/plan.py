"""What each rank reads in an epoch, and how each sample is cropped: shared by both backends.

Both loaders execute the same plan, so they deliver the same samples in the same order with
the same crops, and differ only by their decoders and resamplers.

Order: ``train=True`` shuffles with ``permutation(seed, epoch)`` (the same on every rank);
``train=False`` keeps index order. Sharding: rank ``r`` of ``w`` takes positions
``r, r + w, r + 2w, ...`` of that order, so the ranks together see every sample exactly once.
``drop_last=True`` first trims the order to a multiple of ``w * batch_size``, so every rank
yields the same number of full batches (what DDP needs); ``drop_last=False`` drops nothing and
the last batch of a rank may be smaller.

Crops: a box ``(x0, y0, w, h)`` in the stored image's pixels (integers) and a horizontal flip.
Training: random-resized crop (torchvision's algorithm: area fraction in ``crop_scale``,
aspect ratio log-uniform in ``crop_ratio``, ten tries then a centre crop) and flip with
probability 1/2. Evaluation: the centred square of side ``eval_crop_fraction * min(W, H)``, no
flip. The random numbers are a hash of ``(seed, epoch, index)``, so a sample's crop does not
depend on the rank, the world size or the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropConfig:
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_crop_fraction: float = 1.0

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 < self.eval_crop_fraction <= 1:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")


def epoch_order(n: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int,
                batch_size: int, drop_last: bool) -> list[np.ndarray]:
    """This rank's batches of sample indices for one epoch."""
    order = (np.random.default_rng([seed, epoch]).permutation(n) if train
             else np.arange(n))
    if drop_last:
        order = order[: (n // (world_size * batch_size)) * world_size * batch_size]
    mine = order[rank::world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def num_batches(n: int, *, rank: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return n // (world_size * batch_size)
    mine = len(range(rank, n, world_size))
    return math.ceil(mine / batch_size)


def _uniform(seed: int, epoch: int, index: np.ndarray, stream: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (seed, epoch, index, stream)."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        key = (seed * 0x100000001B3 + epoch * 0x9E3779B1 + stream * 0x85EBCA77) & (2**64 - 1)
        x = x + np.uint64(key)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(sizes: np.ndarray, index: np.ndarray, *, train: bool, seed: int, epoch: int,
               config: CropConfig) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (B, 4) int64 ``x0, y0, w, h`` and flips (B,) bool for the samples ``index``."""
    wh = sizes[index].astype(np.float64)
    W, H = wh[:, 0], wh[:, 1]
    if not train:
        side = np.maximum(1, np.round(config.eval_crop_fraction * np.minimum(W, H)))
        boxes = np.stack([np.floor((W - side) / 2), np.floor((H - side) / 2), side, side], 1)
        return boxes.astype(np.int64), np.zeros(len(index), bool)

    tries = 10
    u = [_uniform(seed, epoch, index, k) for k in range(4 * tries + 1)]
    area = W * H
    lo, hi = config.crop_scale
    log_lo, log_hi = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    boxes = np.zeros((len(index), 4))
    found = np.zeros(len(index), bool)
    for t in range(tries):
        target = area * (lo + (hi - lo) * u[4 * t])
        ratio = np.exp(log_lo + (log_hi - log_lo) * u[4 * t + 1])
        w = np.round(np.sqrt(target * ratio))
        h = np.round(np.sqrt(target / ratio))
        ok = ~found & (w > 0) & (h > 0) & (w <= W) & (h <= H)
        x0 = np.floor(u[4 * t + 2] * (W - w + 1))
        y0 = np.floor(u[4 * t + 3] * (H - h + 1))
        boxes[ok] = np.stack([x0, y0, w, h], 1)[ok]
        found |= ok
    if not found.all():  # torchvision's fallback: centre crop with the ratio clamped
        r = W / H
        w = np.where(r < config.crop_ratio[0], W, np.where(r > config.crop_ratio[1],
                     np.round(H * config.crop_ratio[1]), W))
        h = np.where(r < config.crop_ratio[0], np.round(W / config.crop_ratio[0]), H)
        fb = np.stack([np.floor((W - w) / 2), np.floor((H - h) / 2), w, h], 1)
        boxes[~found] = fb[~found]
    flips = (u[4 * tries] < 0.5) if config.flip else np.zeros(len(index), bool)
    return boxes.astype(np.int64), flips
