"""Run every analysis for one classifier, and compare inversion methods on the same images.

Layout written under a classifier's folder (what ``fastinv.invert.report`` reads)::

    <dir>/classifier.json                 name, robust or not, accuracies
    <dir>/analyses/<analysis>/metrics.json + PNGs
    <dir>/methods.json                    inverter vs DeePSiM vs optimization, same images
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastinv.invert import analyses
from fastinv.invert.baselines import OptimizationConfig, optimize_inversion
from fastinv.invert.metrics import json_safe, reconstruction_metrics
from fastinv.io import atomic_write_text

ANALYSES = ("reconstruct", "resample", "misclassified", "shift", "scale", "perturb")


def run_analyses(
    G,
    classifier,
    data: analyses.Images,
    out_dir: str | Path,
    *,
    which: Sequence[str] = ANALYSES,
    class_names: Sequence[str] | None = None,
    k: int = 8,
    sweeps: dict[str, Sequence[float]] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict]:
    """Run the named analyses into ``out_dir/<analysis>/``; returns their metrics by name."""
    out_dir = Path(out_dir)
    unknown = set(which) - set(ANALYSES)
    if unknown:
        raise ValueError(f"unknown analyses {sorted(unknown)}; choose from {ANALYSES}")
    sweeps = sweeps or {}
    results = {}
    names = list(which)
    it = names
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="analyses", unit="analysis", leave=False)
    for name in it:
        d = out_dir / name
        if name == "reconstruct":
            results[name] = analyses.reconstruct(G, classifier, data, d, seed=seed)
        elif name == "resample":
            results[name] = analyses.resample(G, classifier, data, d, k=k, seed=seed)
        elif name == "misclassified":
            results[name] = analyses.misclassified(G, classifier, data, d,
                                                   class_names=class_names, seed=seed)
        else:
            results[name] = analyses.logit_sweep(G, classifier, data, d, kind=name,
                                                 values=sweeps.get(name), seed=seed)
    return results


def _timed(fn: Callable[[], torch.Tensor], device) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compare_methods(
    classifier,
    data: analyses.Images,
    decoders: dict[str, torch.nn.Module],
    out_path: str | Path,
    *,
    optimization: OptimizationConfig | None = None,
    n_optimization: int = 32,
    seed: int = 0,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Metrics of each feedforward decoder and of optimization-based inversion on ``data``.

    Feedforward methods see every image; optimization, which costs ``steps × restarts``
    classifier passes per image, sees the first ``n_optimization`` — and each feedforward
    method is also scored on that subset (``*_opt_subset`` entries) so the comparison is on
    the same images. Returns (metrics by method, reconstructions by method).
    """
    device = data.logits.device
    results: dict[str, dict] = {}
    recs: dict[str, torch.Tensor] = {}
    n_opt = min(n_optimization, len(data))
    sub = data.subset(torch.arange(n_opt, device=device))
    for name, dec in decoders.items():
        rec, secs = _timed(lambda dec=dec: analyses.invert(dec, data.logits, seed=seed), device)
        rec = analyses.match_size(rec, data.images)
        m = reconstruction_metrics(classifier, rec, data.images, data.labels, data.logits)
        m["seconds_per_image"] = secs / len(data)
        m["n_images"] = len(data)
        results[name] = m
        recs[name] = rec
        if n_opt > 0:
            results[f"{name}_opt_subset"] = reconstruction_metrics(
                classifier, rec[:n_opt], sub.images, sub.labels, sub.logits)
    if n_opt > 0 and optimization is not None:
        res = optimize_inversion(classifier, sub.logits, data.images.shape[-1], optimization)
        m = reconstruction_metrics(classifier, res.images, sub.images, sub.labels, sub.logits)
        m.update(seconds_per_image=res.seconds / n_opt, n_images=n_opt,
                 logit_distance_start=res.initial_distance.mean().item(),
                 logit_distance_end=res.logit_distance.mean().item(),
                 steps=optimization.steps, restarts=optimization.restarts)
        results["optimization"] = m
        recs["optimization"] = res.images
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(json_safe(results), indent=2))
    return results, recs


def write_classifier_info(out_dir: str | Path, info: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "classifier.json", json.dumps(json_safe(info), indent=2))
