"""Factor retention: which nuisance factors of x can still be read off its reconstruction x̂?

On the synthetic dataset every image's factors (colours, texture, position, scale, rotation)
are known. A small CNN regressor is trained on real images to predict them; its R² on held-out
real images is the ceiling, and its R² on reconstructions (targets: the factors of the
originals) says how much of each factor the logits carried through the inverter. This turns
"the logits keep more than the class" into a table.

Rotation is circular, so it is regressed as (cos θ, sin θ) and scored as the mean R² of the
two; shapes with rotational symmetry (circle, square, ...) make it partly unidentifiable even
on real images, which the real-image ceiling shows. Texture is a category index scored as a
number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.metrics import r2_score
from torch import nn

from fastinv.train.optim import fused
from fastinv.train.precision import autocast, autocast_dtype

DEFAULT_FACTORS = (
    "fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b", "texture", "x", "y", "scale", "rotation",
)


def factor_targets(
    table: Mapping[str, Sequence[float]], factors: Sequence[str] = DEFAULT_FACTORS
) -> tuple[torch.Tensor, list[str]]:
    """Regression targets (N, T) from factor columns; rotation (degrees) becomes cos and sin."""
    cols, names = [], []
    for f in factors:
        if f not in table:
            raise KeyError(f"factor {f!r} is not in the factor table (columns: {sorted(table)})")
        v = np.asarray(table[f], dtype=np.float64)
        if f == "rotation":
            rad = np.deg2rad(v)
            cols += [np.cos(rad), np.sin(rad)]
            names += ["rotation_cos", "rotation_sin"]
        else:
            cols.append(v)
            names.append(f)
    return torch.tensor(np.stack(cols, axis=1), dtype=torch.float32), names


class FactorRegressor(nn.Module):
    """Images in [-1, 1] -> standardised factor targets; ``predict`` undoes the standardisation."""

    def __init__(self, num_targets: int, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        # Position needs where, not only what: keep a coarse 4x4 map instead of a global mean.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(),
                                  nn.Linear(128, num_targets))
        self.register_buffer("target_mean", torch.zeros(num_targets))
        self.register_buffer("target_std", torch.ones(num_targets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.net(x)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        out = [self(x) for x in images.split(batch_size)]
        return torch.cat(out) * self.target_std + self.target_mean


def train_factor_regressor(
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    seed: int = 0,
    amp: str = "auto",
    progress: bool = False,
) -> FactorRegressor:
    """Fit a ``FactorRegressor`` on real images (N, 3, H, W) in [-1, 1] and targets (N, T).

    ``amp`` (``fastinv.train.precision``): the forward under bf16 autocast where the device
    computes bf16 natively ("auto"), as the classifiers train; the loss and the weights stay
    float32, and ``predict`` (the measurement) runs in float32."""
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} target rows")
    torch.manual_seed(seed)
    device = images.device
    autocast_dtype(amp, device)  # a bad amp fails here, before any work
    # channels_last: oneDNN's convolutions run faster in it on CPU (and with bf16 on CUDA);
    # with bf16 autocast one training step at the demo's sizes took 19 ms against 42 in fp32 NCHW
    # (2-core AMX Xeon, benchmarks/RESULTS.md Demo round 24)
    model = FactorRegressor(targets.shape[1], width).to(device, memory_format=torch.channels_last)
    model.target_mean.copy_(targets.mean(0))
    model.target_std.copy_(targets.std(0).clamp_min(1e-6))
    y = (targets.to(device) - model.target_mean) / model.target_std
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=fused(device))
    steps = epochs * max(1, -(-images.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    it = range(epochs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="factor regressor", unit="epoch", leave=False)
    model.train()
    for _ in it:
        perm = torch.randperm(images.shape[0], generator=gen).to(device)
        for idx in perm.split(batch_size):
            with autocast(amp, device):
                pred = model(images[idx].contiguous(memory_format=torch.channels_last))
            loss = nn.functional.mse_loss(pred.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def r2_per_factor(pred: torch.Tensor, targets: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """R² per factor (sklearn); rotation's cos/sin are averaged into one 'rotation' entry."""
    p, t = pred.detach().cpu().double().numpy(), targets.detach().cpu().double().numpy()
    scores = {n: float(r2_score(t[:, i], p[:, i])) for i, n in enumerate(names)}
    if "rotation_cos" in scores:
        scores["rotation"] = (scores.pop("rotation_cos") + scores.pop("rotation_sin")) / 2
    return scores


def factor_retention(
    regressor: FactorRegressor,
    targets: torch.Tensor,
    names: Sequence[str],
    real: torch.Tensor,
    reconstructions: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """R² per factor on the real images (ceiling) and on each method's reconstructions of them."""
    size = real.shape[-2:]
    out = {"real": r2_per_factor(regressor.predict(real), targets, names)}
    for method, rec in reconstructions.items():
        if rec.shape[-2:] != size:
            rec = nn.functional.interpolate(rec, size=size, mode="bilinear", align_corners=False)
        out[method] = r2_per_factor(regressor.predict(rec), targets, names)
    return out


def _r2_intervals(pred: np.ndarray, t: np.ndarray, names: Sequence[str], n_boot: int,
                  seed: int) -> dict[str, dict]:
    """Bootstrap 95% interval (over rows) of each factor's R² of ``pred`` against ``t``;
    rotation averages its cos / sin columns, as ``r2_per_factor`` does."""
    from fastinv.invert.stats import bootstrap_stat

    cols = {n: [i] for i, n in enumerate(names) if not n.startswith("rotation_")}
    rot = [i for i, n in enumerate(names) if n.startswith("rotation_")]
    if rot:
        cols["rotation"] = rot

    # R² in numpy rather than sklearn's r2_score: it runs n_boot times per factor
    def r2(idx, js):
        vals = []
        for j in js:
            tt, pp = t[idx, j], pred[idx, j]
            den = ((tt - tt.mean()) ** 2).sum()
            vals.append(1 - ((pp - tt) ** 2).sum() / den if den > 0 else np.nan)
        return float(np.mean(vals))

    return {f: bootstrap_stat(lambda idx, js=js: r2(idx, js), len(t), n_boot=n_boot,
                              seed=seed).to_dict() for f, js in cols.items()}


def factor_intervals(
    regressor: FactorRegressor,
    targets: torch.Tensor,
    names: Sequence[str],
    reconstructions: Mapping[str, torch.Tensor],
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, dict[str, dict]]:
    """Bootstrap 95% interval (over images) of each factor's R² on each method's outputs.

    A factor the output does not carry has R² ≤ 0 (the regressor's guesses vary, the truth
    does not follow them), so an interval above 0 says the factor survived the logits. The
    converse does not hold: an output whose factor follows x's only weakly but varies as much
    as the data's scores below 0 too (R² = 2ρ - 1 at equal variances)."""
    t = targets.detach().cpu().double().numpy()
    return {method: _r2_intervals(regressor.predict(rec).detach().cpu().double().numpy(), t,
                                  names, n_boot, seed)
            for method, rec in reconstructions.items()}


def _class_by_logit_features(logits: torch.Tensor) -> torch.Tensor:
    """(N, C·(C+1)): the logits and a constant, placed in the block of Φ's class (argmax)."""
    z = logits.detach().cpu().double()
    onehot = nn.functional.one_hot(z.argmax(1), z.shape[1]).double()
    z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    return (onehot[:, :, None] * z1[:, None, :]).flatten(1)


def logit_probe(
    train_logits: torch.Tensor,
    train_targets: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    *,
    ridge: float = 1e-3,
    n_boot: int = 500,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, dict]]:
    """What the logits themselves carry of each factor, with no image model: one least-squares
    map from the logits to the factors per Φ class (class x logits features, ridge ``ridge``
    per training row), fit on the training images' logits and scored on held-out ones.
    Returns (R² per factor, bootstrap 95% interval of each over the held-out images).

    The logit NN (the training image nearest in logit space) reads a factor only where it
    moves the logits the same way in every class; on the synthetic shapes the size is a
    different logit direction per class (RESULTS.md Demo round 29: R² 0.59 / 0.74 for this
    probe, 0.14 / 0.17 for one linear map of the logits), so a factor this probe reads is in
    the logits even where the nearest neighbour misses it."""
    if len(train_logits) != len(train_targets) or len(logits) != len(targets):
        raise ValueError("logit probe: logits and factor targets must have the same rows")
    x, y = _class_by_logit_features(train_logits), train_targets.detach().cpu().double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, x.T @ y)
    pred = _class_by_logit_features(logits) @ w
    t = targets.detach().cpu().double()
    return (r2_per_factor(pred, t, names),
            _r2_intervals(pred.numpy(), t.numpy(), names, n_boot, seed))


def centred_within(v: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``v`` (float64) minus the mean of its class. Class sums by ``bincount``, no loop over
    classes: the within-class r's bootstrap calls this ~48,000 times an evaluation (500
    resamples x 11 factors x 4 methods x 2), 5.4 s of a `--quick` inverter's 46 s with the
    loop (RESULTS.md Demo round 38)."""
    v = np.asarray(v, dtype=np.float64)
    _, inv = np.unique(np.asarray(classes), return_inverse=True)
    inv = inv.ravel()
    return v - (np.bincount(inv, weights=v) / np.bincount(inv))[inv]


def within_class_corr(pred: np.ndarray, t: np.ndarray, classes: np.ndarray) -> float:
    """Pearson r of ``pred`` with ``t`` after each is centred on its class's mean (nan when
    either has no variance within the classes)."""
    p, tt = centred_within(pred, classes), centred_within(t, classes)
    den = np.sqrt((p ** 2).sum() * (tt ** 2).sum())
    return float((p * tt).sum() / den) if den > 0 else float("nan")


def within_class_r(
    pred: torch.Tensor,
    targets: torch.Tensor,
    classes: torch.Tensor,
    names: Sequence[str],
    *,
    n_boot: int = 500,
    seed: int = 0,
    level: float | None = None,
) -> dict[str, dict]:
    """Per factor, the correlation of the regressor's reading of x̂ (``pred``) with x's factor
    (``targets``) within Φ's classes (``classes``: both centred on each class's mean), with a
    bootstrap interval over images: does x̂ follow x in what the logits carry beyond the class?

    R² asks more: an x̂ drawn from what the logits leave open (a sample, not the conditional
    mean) scores R² = 2ρ - 1 at equal variances, below 0 for any ρ < 0.5, so an R² below 0
    cannot tell "does not draw it" from "draws it weakly"; this r can, and centring on the
    class keeps a factor whose mean differs between classes from counting as kept. ``level``
    defaults to 95% over all factors together (Bonferroni: 1 - 0.05 / the number of factors),
    since a finding takes any factor whose interval lies above 0. Rotation averages its cos /
    sin columns. Returns {factor: Interval.to_dict()}."""
    from fastinv.invert.stats import bootstrap_stat

    p = pred.detach().cpu().double().numpy()
    t = targets.detach().cpu().double().numpy()
    c = classes.detach().cpu().numpy()
    if not (len(p) == len(t) == len(c)):
        raise ValueError("within_class_r: predictions, targets and classes must have the same rows")
    cols = {n: [i] for i, n in enumerate(names) if not n.startswith("rotation_")}
    if rot := [i for i, n in enumerate(names) if n.startswith("rotation_")]:
        cols["rotation"] = rot
    level = 1 - 0.05 / len(cols) if level is None else level

    def r(idx, js):
        return float(np.mean([within_class_corr(p[idx, j], t[idx, j], c[idx]) for j in js]))

    return {f: bootstrap_stat(lambda idx, js=js: r(idx, js), len(t), n_boot=n_boot, seed=seed,
                              level=level).to_dict() for f, js in cols.items()}


def carried_factor(within_r: Mapping[str, Mapping], reference: str = "logit NN",
                   among: Sequence[str] | None = None) -> str | None:
    """The factor ``reference`` (the logit-space nearest neighbour: what Φ's logits pin down
    within the data) follows most surely within Φ's classes (the highest lower end of its r's
    interval), from :func:`within_class_r`'s table ``{method: {factor: interval dict}}``,
    among the factors ``among`` (default: all); None without the reference or a finite r."""
    rows = {f: iv["lo"] for f, iv in within_r.get(reference, {}).items()
            if np.isfinite(iv.get("lo", float("nan"))) and (among is None or f in among)}
    return max(rows, key=rows.get) if rows else None


def sorted_within_classes(t: np.ndarray, classes: np.ndarray, n_classes: int = 3,
                          per_class: int = 8) -> list[tuple[int, np.ndarray]]:
    """Rows for a figure of factor ``t``: up to ``n_classes`` classes (most images first, ties
    by class index), each with up to ``per_class`` of its image indices spaced evenly from the
    smallest ``t`` to the largest. Classes with fewer than 2 images are left out."""
    t, classes = np.asarray(t), np.asarray(classes)
    values, counts = np.unique(classes, return_counts=True)
    # most images first; a stable sort keeps np.unique's ascending class order among ties
    order = np.argsort(-counts, kind="stable")
    chosen = values[order][counts[order] >= 2]
    rows = []
    for c in chosen[:n_classes].tolist():
        idx = np.flatnonzero(classes == c)
        idx = idx[np.argsort(t[idx], kind="stable")]
        k = min(per_class, len(idx))
        rows.append((c, idx[np.linspace(0, len(idx) - 1, k).round().astype(int)]))
    return rows


def save_factor_figure(path, factor: str, names: Sequence[str], images: torch.Tensor,
                       recs: Mapping[str, torch.Tensor], targets: torch.Tensor,
                       preds: Mapping[str, torch.Tensor], classes: torch.Tensor,
                       within_r: Mapping[str, Mapping], class_names: Sequence[str] | None = None,
                       n_classes: int = 3, per_class: int = 8):
    """What the logits carry beyond the class, as a picture: held-out images of a few Φ
    classes sorted by ``factor`` with each method's x̂ below them (one noise draw), and for
    each method the regressor's reading of x̂'s factor against x's, both centred on Φ's class,
    titled with :func:`within_class_r`'s r and interval. ``names``: the columns of
    ``targets`` and of each ``preds[method]`` (the regressor's outputs on ``recs[method]``)."""
    from fastinv.invert import figures

    j = list(names).index(factor)
    t = targets[:, j].detach().cpu().double().numpy()
    c = classes.detach().cpu().numpy()
    labels = list(class_names) if class_names else None
    strips = []
    for cls, idx in sorted_within_classes(t, c, n_classes, per_class):
        sel = torch.as_tensor(idx, device=images.device)
        title = labels[cls] if labels and cls < len(labels) else f"class {cls}"
        strips.append((title, [("x", images[sel])] + [(m, r[sel]) for m, r in recs.items()]))
    scatters = []
    for m, p in preds.items():
        iv = within_r.get(m, {}).get(factor, {})
        caption = (f"{m}: r {iv['mean']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}]"
                   if iv else m)
        scatters.append((caption, centred_within(t, c),
                         centred_within(p[:, j].detach().cpu().double().numpy(), c)))
    return figures.save_strips_and_scatters(
        strips, scatters, path, xlabel=f"x's {factor} (minus its class mean)",
        ylabel=f"x̂'s {factor} (regressor), minus its class mean",
        suptitle=f"{factor}: held-out images of Φ's classes from smallest to largest {factor}, "
                 "x̂ below; right: x̂ against x within the class")
