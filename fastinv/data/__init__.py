"""fastinv.data: image loading (DALI pipeline, PIL fallback) and the synthetic factor dataset.

- ``make_loader(root, ...)``: batches of {image, classifier_input, label, index} from an
  ImageFolder tree or a file list (fastinv.data.loader).
- ``make_synthetic_dataset(out, ...)`` / ``load_factors(root, split)``: shapes with known
  nuisance factors, written as an ImageFolder of JPEGs plus factors.csv (fastinv.data.synth).
- ``scan_source`` / ``dataset_classes``: what a dataset holds, and which files are bad
  (fastinv.data.sources).
"""

from fastinv.data.base import ImageLoader
from fastinv.data.loader import dali_available, make_loader
from fastinv.data.plan import CropConfig
from fastinv.data.sources import BadFileReport, Source, dataset_classes, scan_source
from fastinv.data.synth import (
    CLASS_NAMES,
    FACTOR_COLUMNS,
    TEXTURES,
    load_factors,
    make_synthetic_dataset,
)

__all__ = [
    "BadFileReport",
    "CLASS_NAMES",
    "CropConfig",
    "FACTOR_COLUMNS",
    "ImageLoader",
    "Source",
    "TEXTURES",
    "dali_available",
    "dataset_classes",
    "load_factors",
    "make_loader",
    "make_synthetic_dataset",
    "scan_source",
]
