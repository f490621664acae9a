"""Shared by the model / training tests: one tiny synthetic ImageFolder per test session."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, Path] = {}


def tiny_dataset(tmp_path_factory) -> Path:
    """48 images at 32 px, 4 classes, 36 train / 12 val; made once per session."""
    if "root" not in _CACHE:
        from fastinv.data import make_synthetic_dataset

        root = tmp_path_factory.mktemp("train_tiny") / "data"
        _CACHE["root"] = make_synthetic_dataset(root, n=48, resolution=32, seed=0,
                                                val_fraction=0.25, num_classes=4, workers=1)
    return _CACHE["root"]
