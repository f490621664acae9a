"""What a training run shows: TensorBoard scalars and image grids, a progress bar, PNG grids.

Only rank 0 makes one; other ranks get a ``Monitor(enabled=False)`` whose methods do nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fastinv.io import atomic_save_image


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack equally shaped image batches ``(N, 3, H, W)`` in [-1, 1] as grid columns:
    image ``i`` of every batch side by side on row ``i``. Returns ``(3, H', W')`` in [0, 1]."""
    n, _, h, w = rows[0].shape
    cols = len(rows)
    grid = torch.ones(3, n * (h + pad) + pad, cols * (w + pad) + pad)
    for c, batch in enumerate(rows):
        batch = (batch.detach().float().cpu().clamp(-1, 1) + 1) / 2
        for i in range(n):
            y, x = pad + i * (h + pad), pad + c * (w + pad)
            grid[:, y:y + h, x:x + w] = batch[i]
    return grid


def save_png(grid: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    atomic_save_image(Image.fromarray(arr), path)


class Monitor:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool,
                 progress: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last = time.perf_counter()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            keys = ("loss_d", "loss_g", "img_per_s")
            self.bar.set_postfix({k: f"{values[k]:.3g}" for k in keys if k in values})

    def images(self, step: int, tag: str, grid: torch.Tensor) -> None:
        if not self.enabled:
            return
        self.writer.add_image(tag, grid, step)
        save_png(grid, self.run_dir / "samples" / f"{tag}_{step:08d}.png")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
