"""``make_loader``: the one entry point that picks a backend and builds the loader."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from fastinv.data.base import ImageLoader
from fastinv.data.plan import CropConfig
from fastinv.data.sources import scan_source

BACKENDS = ("auto", "dali", "pil")


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported (``pip install nvidia-dali-cuda130``)."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # a broken install counts as missing
        return False
    return True


def make_loader(
    root: str | os.PathLike,
    *,
    resolution: int,
    classifier_size: int,
    classifier_mean: Sequence[float],
    classifier_std: Sequence[float],
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    backend: str = "auto",
    drop_last: bool = False,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    validate: str = "header",
    crop_scale: tuple[float, float] = (0.35, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    eval_crop_fraction: float = 1.0,
    jpeg_draft: bool = True,
    scan_cache: bool | None = None,
) -> ImageLoader:
    """An iterable of batches from an ImageFolder tree or a .txt/.csv file list.

    Every batch is a dict: ``image`` (B, 3, resolution, resolution) float32 in [-1, 1], the GAN
    target; ``classifier_input`` (B, 3, classifier_size, classifier_size) float32,
    ``(x / 255 - classifier_mean) / classifier_std``, from the same crop; ``label`` int64;
    ``index`` int64, the sample's position in ``loader.source.paths`` — all on ``device``
    (default: the current CUDA device when there is one, else CPU).

    ``train=True``: shuffled per epoch with ``seed``, random-resized crop (``crop_scale``,
    ``crop_ratio``) and horizontal ``flip``. ``train=False``: sorted file order, centred square
    crop of ``eval_crop_fraction`` of the short side. Rank ``rank`` of ``world_size`` sees its
    shard exactly once per epoch; ``drop_last=True`` gives every rank the same number of full
    batches. ``len(loader)`` is the number of batches per epoch; ``loader.set_epoch(e)`` picks
    the epoch (otherwise each iteration starts the next one), ``set_epoch(e, start_batch=k)``
    resumes mid-epoch; ``loader.bad_files`` lists the files that were skipped (corrupt or
    unreadable; each is logged once).

    ``backend``: ``"dali"`` (GPU ``mixed`` decoding on a CUDA device, CPU pipeline otherwise),
    ``"pil"`` (torch DataLoader with ``num_workers`` processes), ``"auto"`` (DALI if importable).
    ``validate``: how files are checked when scanning (see fastinv.data.sources);
    ``scan_cache``: reuse earlier scan results (default: for datasets of 10k+ files).
    ``jpeg_draft`` (PIL only): let libjpeg decode big JPEGs at 1/2-1/8 scale (faster; outputs
    then differ from DALI's full decode by a few levels, see tests/test_data_dali.py).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("resolution", resolution), ("classifier_size", classifier_size),
                        ("batch_size", batch_size), ("world_size", world_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if len(classifier_mean) != 3 or len(classifier_std) != 3:
        raise ValueError("classifier_mean and classifier_std need 3 values (R, G, B), in [0, 1] units")
    if min(classifier_std) <= 0:
        raise ValueError(f"classifier_std must be positive, got {classifier_std}")
    if backend == "auto":
        backend = "dali" if dali_available() else "pil"
    elif backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                          "(or pass backend='pil')")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)

    source = scan_source(root, validate=validate, cache=scan_cache)
    common = dict(
        resolution=int(resolution), classifier_size=int(classifier_size),
        classifier_mean=tuple(float(m) for m in classifier_mean),
        classifier_std=tuple(float(s) for s in classifier_std),
        batch_size=int(batch_size), train=bool(train), rank=int(rank),
        world_size=int(world_size), seed=int(seed), drop_last=bool(drop_last), device=device,
        crop=CropConfig(tuple(crop_scale), tuple(crop_ratio), bool(flip), float(eval_crop_fraction)),
    )
    if backend == "dali":
        from fastinv.data.dali_loader import DaliLoader

        return DaliLoader(source, num_threads=max(1, num_workers), **common)
    from fastinv.data.pil_loader import PilLoader

    return PilLoader(source, num_workers=num_workers, draft=jpeg_draft, **common)
