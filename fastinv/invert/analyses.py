"""The inversion analyses: what a trained inverter G(logits, noise) recovers from Φ(x).

Each analysis takes the inverter, its frozen classifier and a set of images (``Images``), writes
PNG figures and a ``metrics.json`` into its output folder, and returns the metrics dict.

- ``reconstruct``: original | reconstructions, and every metric of ``fastinv.invert.metrics``.
- ``resample``: K reconstructions per image with fresh noise and the same logits, plus the
  per-pixel std map: what the logits leave free.
- ``misclassified``: the same for images the classifier gets wrong, with true/predicted labels.
- ``logit_sweep``: logits + c (shift), logits × s (scale), logits + N(0, σ²) (perturb).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastinv.invert import figures
from fastinv.invert.metrics import (
    classifier_logits,
    json_safe,
    noise_std,
    psnr_per_image,
    reconstruction_metrics,
)
from fastinv.io import atomic_write_json

SWEEPS: dict[str, tuple[float, ...]] = {
    "shift": (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0),
    "scale": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    "perturb": (0.0, 0.5, 1.0, 2.0, 4.0),
}


@dataclass
class Images:
    """Originals in [-1, 1], true labels and the classifier's logits Φ(x) (the inverter's input)."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    index: torch.Tensor | None = None  # dataset row of each image (factors.csv order)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> Images:
        index = None if self.index is None else self.index[idx.to(self.index.device)]
        return Images(self.images[idx], self.labels[idx], self.logits[idx], index)

    def sample(self, n: int, seed: int = 0) -> Images:
        """The ``n`` images ``collect_images(..., n, dataset_size=len(self), seed=seed)`` keeps,
        taken from this whole-dataset collection (no second pass over the files)."""
        if self.index is None:
            raise ValueError("Images.sample needs the dataset index of each image")
        keep = kept_rows(len(self), n, seed)
        if keep is None:
            return self
        return self.subset(keep[self.index.cpu()].nonzero().flatten()[:n])

    @classmethod
    def from_images(cls, classifier, images: torch.Tensor, labels: torch.Tensor) -> Images:
        with torch.no_grad():
            return cls(images, labels, classifier_logits(classifier, images))


def kept_rows(dataset_size: int, n: int, seed: int = 0) -> torch.Tensor | None:
    """The seeded random ``n`` of ``dataset_size`` dataset rows an evaluation keeps, as a mask
    over the rows (None: all of them)."""
    if dataset_size <= n:
        return None
    keep = torch.zeros(dataset_size, dtype=torch.bool)
    keep[torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))[:n]] = True
    return keep


def collect_images(
    batches: Iterable[dict],
    classifier: torch.nn.Module,
    n: int,
    device: torch.device | str,
    *,
    dataset_size: int | None = None,
    seed: int = 0,
) -> Images:
    """``n`` images of a ``fastinv.data.make_loader`` stream, with their logits.

    An evaluation loader walks the files in sorted order, i.e. class by class, so the first
    ``n`` would cover only the first classes. With ``dataset_size`` given, a seeded random
    subset of ``n`` dataset indices is kept instead (all batches are read, only those kept).
    """
    keep = None if dataset_size is None else kept_rows(dataset_size, n, seed)
    imgs, labels, logits, index = [], [], [], []
    count = 0
    with torch.no_grad():
        for batch in batches:
            rows = slice(None)
            if keep is not None:
                rows = keep[torch.as_tensor(batch["index"]).cpu()].nonzero().flatten()
                if rows.numel() == 0:
                    continue
            x = batch["image"][rows].to(device)
            imgs.append(x)
            labels.append(batch["label"][rows].to(device))
            logits.append(classifier(batch["classifier_input"][rows].to(device)).float())
            if "index" in batch:
                index.append(torch.as_tensor(batch["index"]).cpu()[rows])
            count += x.shape[0]
            if count >= n:
                break
    if not imgs:
        raise ValueError("collect_images got no batches: is the image folder empty?")
    idx = torch.cat(index)[:n] if index else None
    return Images(torch.cat(imgs)[:n], torch.cat(labels)[:n], torch.cat(logits)[:n], idx)


@torch.no_grad()
def invert(
    G: torch.nn.Module, logits: torch.Tensor, seed: int = 0, batch_size: int = 64
) -> torch.Tensor:
    """x̂ = G(logits, ε) with ε drawn from a seeded generator (same seed, same images)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = logits.device
    out = []
    for chunk in logits.split(batch_size):
        noise = G.sample_noise(chunk.shape[0], generator=gen).to(device)
        out.append(G(chunk, noise).float().clamp(-1, 1))
    return torch.cat(out)


def match_size(rec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if rec.shape[-2:] == like.shape[-2:]:
        return rec
    return torch.nn.functional.interpolate(
        rec, size=like.shape[-2:], mode="bilinear", align_corners=False, antialias=True
    )


def _upscale(data: Images) -> int:
    """Nearest-neighbour factor that shows a tile at about 128 px (×4 at 32 px): small images
    are unreadable at their own size."""
    return max(1, 128 // data.images.shape[-1])


def write_metrics(out_dir: Path, metrics: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", json_safe(metrics))
    return metrics


def reconstruct(
    G, classifier, data: Images, out_dir: str | Path, *, n_show: int = 8, n_rec: int = 2, seed: int = 0
) -> dict:
    """Reconstruct every image; grid of original | ``n_rec`` reconstructions; all metrics."""
    out_dir = Path(out_dir)
    rec = match_size(invert(G, data.logits, seed=seed), data.images)
    metrics = reconstruction_metrics(classifier, rec, data.images, data.labels, data.logits)
    metrics["n_images"] = len(data)
    show = min(n_show, len(data))
    columns = [data.images[:show], rec[:show]]
    for r in range(1, n_rec):
        columns.append(match_size(invert(G, data.logits[:show], seed=seed + r), data.images))
    figures.save_columns(columns, out_dir / "reconstruct.png", upscale=_upscale(data))
    return write_metrics(out_dir, metrics)


def resample(
    G, classifier, data: Images, out_dir: str | Path, *, k: int = 8, n_show: int = 6, seed: int = 0
) -> dict:
    """K reconstructions per image with fresh noise: grid, std maps, mean pixel std."""
    if k < 2:
        raise ValueError(f"resample needs k >= 2 noise draws to measure a std, got k={k}")
    out_dir = Path(out_dir)
    samples = torch.stack(
        [match_size(invert(G, data.logits, seed=seed + j), data.images) for j in range(k)], dim=1
    )  # (N, K, C, H, W)
    std = noise_std(samples)
    per_draw = [
        reconstruction_metrics(classifier, samples[:, j], data.images, data.labels, data.logits)
        for j in range(k)
    ]
    metrics = {key: sum(m[key] for m in per_draw) / k for key in per_draw[0]}
    metrics.update(noise_std=std.mean().item(), k=k, n_images=len(data),
                   # per image, with the dataset rows, so the report can pair two classifiers
                   noise_std_per_image=std.mean(dim=(1, 2)).tolist(),
                   index=None if data.index is None else data.index.tolist())
    show = min(n_show, len(data))
    columns = [data.images[:show]] + [samples[:show, j] for j in range(k)]
    figures.save_columns(columns, out_dir / "resample.png", upscale=_upscale(data))
    figures.save_std_maps(data.images[:show], std[:show], out_dir / "resample_std.png")
    return write_metrics(out_dir, metrics)


def other_indices(n: int, rows: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """(len(rows), min(k, n - 1)) indices into a set of ``n`` images: for each index in
    ``rows``, that many distinct other images of the set (never itself), drawn at random."""
    if n < 2:
        raise ValueError(f"other_indices needs at least 2 images, got {n}")
    k = min(k, n - 1)
    gen = torch.Generator().manual_seed(seed)
    # a random permutation of the n - 1 others: draw from 0..n-2 and skip the row's own index
    draws = torch.stack([torch.randperm(n - 1, generator=gen)[:k] for _ in range(len(rows))])
    return draws + (draws >= rows.view(-1, 1)).long()


def misclassified(
    G,
    classifier,
    data: Images,
    out_dir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    n_show: int = 8,
    seed: int = 0,
    n_others: int = 64,
) -> dict:
    """Reconstruct the images the classifier gets wrong; does x̂ look like x or like the label?

    ``rec_top1_vs_pred`` (does x̂ get the same wrong label) and pixel fidelity answer "the
    logits of a misclassified image still reconstruct the image, not the predicted class".
    """
    out_dir = Path(out_dir)
    pred = data.logits.argmax(dim=1)
    wrong = (pred != data.labels).nonzero().flatten()
    metrics: dict = {"n_images": len(data), "n_misclassified": int(wrong.numel())}
    if wrong.numel() == 0:
        metrics["note"] = "the classifier gets every image right: nothing to show"
        return write_metrics(out_dir, metrics)
    sub = data.subset(wrong)
    rec = match_size(invert(G, sub.logits, seed=seed), sub.images)
    metrics.update(reconstruction_metrics(classifier, rec, sub.images, sub.labels, sub.logits))
    # Chance level: the same reconstructions scored against other images of the set. x̂ that
    # looks like its own x, not like a generic member of the predicted class, beats it clearly.
    # Each x̂ against the mean of n_others images, not one: PSNR here is mostly the background
    # colour, which the logits hardly carry, so one random image per x̂ made the chance level
    # as noisy as the effect (a dozen misclassified images swung the interval either way).
    others = other_indices(len(data), wrong.cpu(), n_others, seed).to(wrong.device)
    vs_other = torch.stack([psnr_per_image(rec, data.images[others[:, j]])
                            for j in range(others.shape[1])], dim=1).mean(dim=1)
    metrics["psnr_vs_other_images"] = float(vs_other.mean())
    metrics["n_other_images"] = int(others.shape[1])
    metrics["psnr_per_image"] = psnr_per_image(rec, sub.images).tolist()
    metrics["psnr_vs_other_per_image"] = vs_other.tolist()
    # Reference point: reconstructions of correctly classified images of the same run.
    right = (pred == data.labels).nonzero().flatten()
    if right.numel() > 0:
        ok = data.subset(right)
        rec_ok = match_size(invert(G, ok.logits, seed=seed), ok.images)
        ref = reconstruction_metrics(classifier, rec_ok, ok.images, ok.labels, ok.logits)
        metrics["correct_psnr"] = ref["psnr"]
        metrics["correct_ssim"] = ref["ssim"]
    show = min(n_show, wrong.numel())
    names = list(class_names) if class_names else [str(i) for i in range(data.logits.shape[1])]
    tiles = torch.stack([sub.images[:show], rec[:show]], dim=1).flatten(0, 1)
    titles = []
    for i in range(show):
        t, p = names[int(sub.labels[i])], names[int(pred[wrong[i]])]
        titles += [f"x: true {t}", f"x̂ (pred {p})"]
    figures.save_titled_grid(tiles, titles, out_dir / "misclassified.png", ncol=min(8, 2 * show))
    return write_metrics(out_dir, metrics)


def modify_logits(kind: str, logits: torch.Tensor, value: float, seed: int = 0) -> torch.Tensor:
    """logits + value (shift), logits × value (scale) or logits + N(0, value²) (perturb)."""
    if kind == "shift":
        return logits + value
    if kind == "scale":
        return logits * value
    if kind == "perturb":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(logits.shape, generator=gen).to(logits.device, logits.dtype)
        return logits + value * noise
    raise ValueError(f"unknown logit manipulation {kind!r}; choose one of {sorted(SWEEPS)}")


def logit_sweep(
    G,
    classifier,
    data: Images,
    out_dir: str | Path,
    *,
    kind: str,
    values: Sequence[float] | None = None,
    n_show: int = 6,
    seed: int = 0,
) -> dict:
    """Reconstruct from manipulated logits over a sweep; metrics are against the original x."""
    out_dir = Path(out_dir)
    values = list(values if values is not None else SWEEPS[kind])
    show = min(n_show, len(data))
    rows = [data.images[:show]]
    per_value = []
    for v in values:
        z = modify_logits(kind, data.logits, v, seed=seed)
        # Same noise for every value: the only thing that changes along a row is the logits.
        rec = match_size(invert(G, z, seed=seed), data.images)
        m = reconstruction_metrics(classifier, rec, data.images, data.labels, data.logits)
        m["value"] = float(v)
        per_value.append(m)
        rows.append(rec[:show])
    figures.save_columns(rows, out_dir / f"{kind}.png", upscale=_upscale(data))
    curve_keys = ["top1_vs_orig", "logit_cosine", "psnr", "ssim"]
    figures.save_curves(
        values,
        {k: [m[k] for m in per_value] for k in curve_keys},
        out_dir / f"{kind}_curves.png",
        xlabel={"shift": "c (logits + c)", "scale": "s (logits × s)", "perturb": "σ"}[kind],
        title=f"logit {kind}",
    )
    metrics = {"kind": kind, "values": values, "per_value": per_value, "n_images": len(data)}
    return write_metrics(out_dir, metrics)
