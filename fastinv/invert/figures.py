"""PNG figures for the analyses: image grids (torchvision) and plots (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from fastinv.io import atomic_savefig, atomic_write  # noqa: E402


def _save_image(images, path, **kwargs) -> None:
    """torchvision's save_image, written atomically (format from the suffix)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda fh: save_image(images, fh, format=fmt, **kwargs))


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, on the CPU."""
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def save_columns(columns: Sequence[torch.Tensor], path: Path, upscale: int = 1) -> Path:
    """Save a grid whose j-th column is ``columns[j]`` (original | reconstructions ...)."""
    n = columns[0].shape[0]
    images = torch.stack([to_unit(c) for c in columns], dim=1).reshape(
        n * len(columns), *columns[0].shape[1:]
    )
    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_image(images, path, nrow=len(columns), padding=2, pad_value=1.0)
    return path


def save_titled_grid(
    images: torch.Tensor, titles: Sequence[str], path: Path, ncol: int, suptitle: str = ""
) -> Path:
    """Images in [-1, 1] with a short title each (labels of misclassified images)."""
    n = images.shape[0]
    nrow = max(1, -(-n // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 * ncol, 1.8 * nrow), squeeze=False)
    unit = to_unit(images)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(unit[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    top = 1.0
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
        top = 1 - 0.3 / fig.get_figheight()  # tight_layout ignores the suptitle: leave it 0.3 in
    fig.tight_layout(rect=(0, 0, 1, top))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_std_maps(originals: torch.Tensor, std_maps: torch.Tensor, path: Path) -> Path:
    """Originals above their per-pixel noise std maps (shared colour scale)."""
    n = originals.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.2), squeeze=False)
    vmax = float(std_maps.max().clamp_min(1e-6))
    unit = to_unit(originals)
    im = None
    for i in range(n):
        axes[0, i].imshow(unit[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        im = axes[1, i].imshow(std_maps[i].cpu().numpy(), cmap="magma", vmin=0, vmax=vmax)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="pixel std over noise")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_curves(
    xs: Sequence[float], curves: dict[str, Sequence[float]], path: Path, xlabel: str, title: str
) -> Path:
    """One panel per metric, y against the swept value."""
    keys = list(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(xs, curves[key], marker="o")
        ax.set_xlabel(xlabel)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_strips_and_scatters(
    strips: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]],
    scatters: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    path: Path, xlabel: str, ylabel: str, suptitle: str = "",
) -> Path:
    """Left: for each strip (a title and rows of (label, images in [-1, 1])) its rows of
    tiles one under the other; right: one scatter panel per (title, x, y), each with its
    least-squares line and the identity y = x dashed."""
    n_rows = sum(len(rows) for _, rows in strips)
    n_cols = max((len(im) for _, rows in strips for _, im in rows), default=1)
    n_sc = max(1, len(scatters))
    tile = 0.7  # inches a tile, square: the figure's height follows the rows
    height = max(2.6 * n_sc, tile * 1.1 * n_rows + 0.9)
    fig = plt.figure(figsize=(tile * n_cols + 4.4, height))
    outer = fig.add_gridspec(1, 2, width_ratios=(tile * n_cols, 3.2), wspace=0.3,
                             left=0.07, right=0.97, top=1 - 0.6 / height, bottom=0.6 / height)
    left = outer[0].subgridspec(max(1, n_rows), n_cols, hspace=0.08, wspace=0.05)
    r = 0
    for title, rows in strips:
        for k, (label, images) in enumerate(rows):
            unit = to_unit(images)
            for i in range(n_cols):
                ax = fig.add_subplot(left[r, i])
                ax.set_xticks([])
                ax.set_yticks([])
                if i < len(unit):
                    ax.imshow(unit[i].permute(1, 2, 0).numpy(), interpolation="nearest")
                else:
                    ax.axis("off")
                if i == 0:
                    ax.set_ylabel(f"{title}\n{label}" if k == 0 else label, fontsize=6)
            r += 1
    right = outer[1].subgridspec(n_sc, 1, hspace=0.6)
    for k, (title, x, y) in enumerate(scatters):
        ax = fig.add_subplot(right[k])
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ax.scatter(x, y, s=4, alpha=0.5)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.7, label="y = x")
        if len(x) > 1 and x.var() > 0:
            slope, intercept = np.polyfit(x, y, 1)
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, intercept + slope * xs, "r-", lw=1, label=f"slope {slope:+.2f}")
            ax.legend(fontsize=6, loc="upper left")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path
