"""Run every analysis for one classifier, and compare inversion methods on the same images.

Layout written under a classifier's folder (what ``fastinv.invert.report`` reads)::

    <dir>/classifier.json                 name, robust or not, accuracies
    <dir>/analyses/<analysis>/metrics.json + PNGs
    <dir>/methods.json                    inverter vs DeePSiM vs NN vs optimization, same images
    <dir>/per_image.json                  per-image values of each method (for intervals)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastinv.invert import analyses, figures, quality
from fastinv.invert.baselines import OptimizationConfig, optimize_inversion
from fastinv.invert.metrics import classifier_logits, json_safe, reconstruction_metrics
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
    misclassified_data: analyses.Images | None = None,
) -> dict[str, dict]:
    """Run the named analyses into ``out_dir/<analysis>/``; returns their metrics by name.

    ``misclassified_data``: the images searched for ones Φ gets wrong (default ``data``). A
    classifier that is right on 99.9% of its held-out images leaves one or none in an
    evaluation subset; a whole held-out split holds a few more."""
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
            results[name] = analyses.misclassified(
                G, classifier, data if misclassified_data is None else misclassified_data, d,
                class_names=class_names, seed=seed)
        else:
            results[name] = analyses.logit_sweep(G, classifier, data, d, kind=name,
                                                 values=sweeps.get(name), seed=seed)
    return results


def optimization_subset(n: int, n_optimization: int) -> torch.Tensor:
    """Indices of the images optimisation-based inversion sees: ``n_optimization`` of ``n``,
    evenly spaced (every class of a class-ordered set)."""
    k = max(0, min(n_optimization, n))
    return torch.div(torch.arange(k) * n, max(k, 1), rounding_mode="floor")


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
    judge=None,
    optimization: OptimizationConfig | None = None,
    n_optimization: int = 32,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    n_show: int = 10,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Metrics of each feedforward decoder and of optimization-based inversion on ``data``.

    Feedforward methods see every image; optimization, which costs ``steps × restarts``
    classifier passes per image, sees ``n_optimization`` of them spread evenly over the set
    (``optimization_subset``: the set is in class order, so its first images would all be
    of one class) — and each feedforward
    method is also scored on that subset (``*_opt_subset`` entries) so the comparison is on
    the same images. With a ``judge`` (an independent classifier, see
    ``fastinv.invert.quality``) every method also gets judge agreement and KID, and the
    per-image values go to ``per_image.json`` beside ``out_path`` for the report's intervals.
    Returns (metrics by method, reconstructions by method).
    """
    device = data.logits.device
    results: dict[str, dict] = {}
    recs: dict[str, torch.Tensor] = {}
    per: dict[str, dict[str, list]] = {}
    sub_idx = optimization_subset(len(data), n_optimization).to(device)
    n_opt = len(sub_idx)
    sub = data.subset(sub_idx)
    judge_orig = real_feats = None
    if judge is not None:
        with torch.no_grad():
            judge_orig = classifier_logits(judge, data.images).argmax(1)
        real_feats = quality.judge_features(judge, data.images)

    def score(rec, images, labels, logits, jorig):
        m = reconstruction_metrics(classifier, rec, images, labels, logits)
        if judge is not None:
            values = quality.per_image(classifier, judge, rec, images, labels, logits, jorig)
            m.update({k: v.mean().item() for k, v in values.items() if k.startswith("judge")})
            m.update(quality.realism(judge, data.images, rec, seed=seed, real_features=real_feats))
            return m, values
        return m, None

    for name, dec in decoders.items():
        rec, secs = _timed(lambda dec=dec: analyses.invert(dec, data.logits, seed=seed), device)
        rec = analyses.match_size(rec, data.images)
        m, values = score(rec, data.images, data.labels, data.logits, judge_orig)
        m["seconds_per_image"] = secs / len(data)
        m["n_images"] = len(data)
        results[name] = m
        recs[name] = rec
        if values is not None:
            per[name] = {k: v.tolist() for k, v in values.items()}
        if n_opt > 0:
            results[f"{name}_opt_subset"] = score(
                rec[sub_idx], sub.images, sub.labels, sub.logits,
                None if judge_orig is None else judge_orig[sub_idx])[0]
    if n_opt > 0 and optimization is not None:
        res = optimize_inversion(classifier, sub.logits, data.images.shape[-1], optimization)
        m, _ = score(res.images, sub.images, sub.labels, sub.logits,
                     None if judge_orig is None else judge_orig[sub_idx])
        m.update(seconds_per_image=res.seconds / n_opt, n_images=n_opt,
                 logit_distance_start=res.initial_distance.mean().item(),
                 logit_distance_end=res.logit_distance.mean().item(),
                 steps=optimization.steps, restarts=optimization.restarts)
        results["optimization"] = m
        recs["optimization"] = res.images
    if judge is not None:  # the ceiling: the judge on the originals themselves
        results["real images"] = {
            "judge_vs_label": (judge_orig == data.labels.to(judge_orig.device)).float().mean().item(),
            "n_images": len(data)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(json_safe(results), indent=2))
    if judge is not None and n_show > 0:
        full = {k: v for k, v in recs.items() if v.shape[0] == len(data)}  # not the opt subset
        _judged_figure(judge, data, full, out_path.parent / "methods.png", class_names, n_show)
    if per:
        index = data.index.tolist() if data.index is not None else list(range(len(data)))
        atomic_write_text(out_path.parent / "per_image.json", json.dumps(json_safe(
            {"index": index, "labels": data.labels.tolist(), "methods": per,
             **({"class_names": list(class_names)} if class_names else {})})))
    return results, recs


def _judged_figure(judge, data, recs: dict[str, torch.Tensor], path: Path,
                   class_names: Sequence[str] | None, n_show: int) -> None:
    """Rows: images; columns: original | each method's x̂; every tile captioned with the
    judge's label (✓ when it is the original's true class). Nearest-neighbour upscaled."""
    labels = data.labels.cpu()
    limit = len(labels)
    # one image of each class first (the evaluation set is in class order), then the rest
    firsts = [int((labels == c).nonzero()[0]) for c in labels.unique()]
    rows = (firsts + [i for i in range(limit) if i not in firsts])[:n_show]
    names = list(class_names) if class_names else [str(i) for i in range(data.logits.shape[1])]
    tiles, titles = [], []
    cols = {"x (real)": data.images, **recs}
    with torch.no_grad():
        judged = {k: classifier_logits(judge, v[rows]).argmax(1) for k, v in cols.items()}
    for r, i in enumerate(rows):
        for k, imgs in cols.items():
            j = int(judged[k][r])
            tiles.append(imgs[i])
            mark = "✓" if j == int(labels[i]) else "✗"
            titles.append(f"{k}\njudge: {names[j]} {mark}" if r == 0 else f"{names[j]} {mark}")
    figures.save_titled_grid(torch.stack(tiles), titles, path, ncol=len(cols),
                             suptitle="judge's label (✓ = x's class)")


def write_classifier_info(out_dir: str | Path, info: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "classifier.json", json.dumps(json_safe(info), indent=2))
