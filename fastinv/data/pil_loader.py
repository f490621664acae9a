"""The PIL loader: the fallback backend and the reference the DALI pipeline is tested against.

A torch DataLoader whose batch sampler is the shared epoch plan (fastinv.data.plan); workers
decode with PIL and return uint8 crops, the main process normalises on the output device.
For JPEG, ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling) whenever
the crop stays at least as large as the largest output, which is most of the cost saved on
big photos. Resampling is PIL's antialiased bilinear (a triangle filter widened by the
downscale factor), which DALI's ``resize(antialias=True, interp_type=LINEAR)`` also uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fastinv.data.base import ImageLoader


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16/32-bit greyscale (``I;16*``, ``I``: 16-bit PNGs) is scaled to 8 bits, as
    DALI does; PIL's own ``convert`` would clip every value above 255 to white."""
    if im.mode.startswith("I"):
        levels = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or levels.max(initial=0) <= 65535 else levels.max()
        grey = np.clip(np.rint(levels * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def decode_crop(path: str, box: Sequence[int], flip: bool, out_sizes: Sequence[int],
                draft: bool = True) -> list[np.ndarray]:
    """Decode ``path``, crop ``box = (x0, y0, w, h)`` (stored-image pixels), resize to each
    square size in ``out_sizes``, flip horizontally if asked: a list of (S, S, 3) uint8."""
    x0, y0, w, h = (int(v) for v in box)
    with Image.open(path) as im:
        W, H = im.size
        if draft and im.format == "JPEG":
            s = max(out_sizes) / min(w, h)
            if s < 1:
                im.draft("RGB", (max(1, math.ceil(W * s)), max(1, math.ceil(H * s))))
        sx, sy = im.size[0] / W, im.size[1] / H
        rgb = _to_rgb(im)
    # Cut the crop out first, then resize: the filter clamps at the crop's edges instead of
    # reading pixels beyond them, as DALI's decode-the-slice-then-resize does. After a draft
    # the box is fractional: cut the whole pixels around it, resize the exact box within.
    left, top, right, bottom = x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy
    il, it = math.floor(left), math.floor(top)
    cut = rgb.crop((il, it, max(il + 1, math.ceil(right)), max(it + 1, math.ceil(bottom))))
    box = (left - il, top - it, right - il, bottom - it)
    outs = []
    for size in out_sizes:
        out = cut.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        outs.append(np.asarray(out))
    return outs


class _CropDataset(torch.utils.data.Dataset):
    """Item = task ``(index, x0, y0, w, h, flip)`` from the plan; never raises on bad files.

    With ``affine`` set (CPU output), workers normalise with numpy (``level * scale + shift``
    per channel) so the work is spread over the processes; otherwise they return uint8 and the
    normalisation happens on the GPU after a 4x smaller transfer."""

    def __init__(self, paths: list[str], resolution: int, classifier_size: int, draft: bool,
                 affine: tuple[np.ndarray, ...] | None):
        self.paths = paths
        self.sizes = (resolution, classifier_size)
        self.draft = draft
        self.affine = None if affine is None else [a.astype(np.float32) for a in affine]

    def __len__(self) -> int:
        return len(self.paths)

    def _chw(self, hwc: np.ndarray, scale, shift) -> np.ndarray:
        if self.affine is not None:
            hwc = hwc.astype(np.float32)
            hwc *= scale
            hwc += shift
        return hwc.transpose(2, 0, 1)

    def __getitem__(self, task):
        index, x0, y0, w, h, flip = task
        try:
            image, cls = decode_crop(self.paths[index], (x0, y0, w, h), flip, self.sizes,
                                     self.draft)
        except Exception as exc:  # a corrupt file must not end the epoch: report it instead
            return index, None, None, f"{type(exc).__name__}: {exc}"
        a = self.affine or (None,) * 4
        return (index, self._chw(image, a[0], a[1]), self._chw(cls, a[2], a[3]), None)


def _collate(items):
    """Stack with numpy (single-threaded: torch.stack's thread pool stalls on a busy machine);
    the tensors made here travel from worker processes through shared memory."""
    good = [it for it in items if it[3] is None]
    bad = [(it[0], it[3]) for it in items if it[3] is not None]
    if not good:
        return {"index": torch.zeros(0, dtype=torch.int64), "bad": bad}
    return {
        "index": torch.tensor([it[0] for it in good], dtype=torch.int64),
        "image": torch.from_numpy(np.stack([it[1] for it in good])),
        "classifier": torch.from_numpy(np.stack([it[2] for it in good])),
        "bad": bad,
    }


class _PlanSampler:
    """Batch sampler over the tasks of the current epoch (set by the loader before iterating)."""

    def __init__(self):
        self.batches: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PilLoader(ImageLoader):
    backend = "pil"

    def __init__(self, source, *, num_workers: int, draft: bool = True, **kwargs):
        super().__init__(source, **kwargs)
        self.num_workers = num_workers
        self._sampler = _PlanSampler()
        dataset = _CropDataset(source.paths, self.resolution, self.classifier_size, draft,
                               self._affine() if self.device.type == "cpu" else None)
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self._sampler, collate_fn=_collate, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, batches = self._start_epoch()
        tasks = []
        for index in batches:
            boxes, flips = self._boxes(index, epoch)
            tasks.append([(int(i), *map(int, b), bool(f)) for i, b, f in zip(index, boxes, flips)])
        self._sampler.batches = tasks
        for raw in self._loader:
            for index, reason in raw["bad"]:
                self.bad_files.add(self.source.paths[index], reason)
            if raw["index"].numel():
                yield self._finish(raw["image"], raw["classifier"], raw["index"])
