"""What both loaders share: the epoch plan, ``len``, ``set_epoch``, bad-file report, and the
final step that turns decoded uint8 crops into the batch dict on the output device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fastinv.data.plan import CropConfig, crop_boxes, epoch_order, num_batches
from fastinv.data.sources import BadFileReport, Source


class ImageLoader:
    """Base of the PIL and DALI loaders; iterate it for batches (see ``make_loader``).

    Each batch is a dict: ``image`` float32 (B, 3, resolution, resolution) in [-1, 1];
    ``classifier_input`` float32 (B, 3, classifier_size, classifier_size), ``(x/255 - mean) /
    std``, from the same crop; ``label`` int64 (B,); ``index`` int64 (B,), the sample's position
    in ``source.paths``. Labels and indices are on the output device too.
    """

    backend = "?"

    def __init__(self, source: Source, *, resolution: int, classifier_size: int,
                 classifier_mean: Sequence[float], classifier_std: Sequence[float],
                 batch_size: int, train: bool, rank: int, world_size: int, seed: int,
                 drop_last: bool, device: torch.device, crop: CropConfig):
        self.source = source
        self.resolution = resolution
        self.classifier_size = classifier_size
        self.batch_size = batch_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = device
        self.crop = crop
        self._epoch = 0
        self._start_batch = 0
        self._mean = torch.tensor(classifier_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(classifier_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._labels = torch.from_numpy(source.labels)

    @property
    def bad_files(self) -> BadFileReport:
        """Skipped files (found by the scan, or failing to decode during an epoch)."""
        return self.source.bad_files

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Use ``epoch``'s shuffle and crops for the next iteration. Without calls, each new
        iteration moves on to the next epoch by itself. ``start_batch`` resumes mid-epoch: the
        next iteration yields that epoch's batches from ``start_batch`` on, without decoding
        the ones before."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self._epoch = int(epoch)
        self._start_batch = int(start_batch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return num_batches(len(self.source), rank=self.rank, world_size=self.world_size,
                           batch_size=self.batch_size, drop_last=self.drop_last)

    def _start_epoch(self) -> tuple[int, list[np.ndarray]]:
        epoch = self._epoch
        self._epoch += 1
        batches = epoch_order(len(self.source), train=self.train, seed=self.seed, epoch=epoch,
                              rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, drop_last=self.drop_last)
        start, self._start_batch = self._start_batch, 0
        return epoch, batches[start:]

    def _boxes(self, index: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return crop_boxes(self.source.sizes, index, train=self.train, seed=self.seed,
                          epoch=epoch, config=self.crop)

    def _affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-channel ``scale, shift`` mapping 8-bit levels to ``image`` and to
        ``classifier_input``: ``out = level * scale + shift``."""
        mean = self._mean.flatten().numpy().astype(np.float64)
        std = self._std.flatten().numpy().astype(np.float64)
        img_scale = np.full(3, 1 / 127.5)
        return (img_scale, -np.ones(3), 1 / (255.0 * std), -mean / std)

    def _finish(self, image: torch.Tensor, classifier: torch.Tensor,
                index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Crops (NCHW; uint8 levels, or already normalised float) -> the batch dict on
        ``self.device``. uint8 is normalised after the transfer (4x fewer bytes to move)."""
        dev = self.device
        non_blocking = dev.type == "cuda"
        image = image.to(dev, non_blocking=non_blocking)
        classifier = classifier.to(dev, non_blocking=non_blocking)
        # contiguous NCHW whatever the decoder's strides (PIL's HWC arrays arrive channels-last):
        # oneDNN's AVX2 1x1 stride-2 convolution backward crashes on channels-last inputs with
        # 4 channels (torch 2.14.1, AMD EPYC: a segfault with 1 thread, a hang with 2)
        nchw = torch.contiguous_format
        if image.dtype == torch.uint8:
            image = image.to(torch.float32, memory_format=nchw).div_(127.5).sub_(1.0)
        if classifier.dtype == torch.uint8:
            classifier = classifier.to(torch.float32, memory_format=nchw).div_(255.0)
            classifier = classifier.sub_(self._mean.to(dev)).div_(self._std.to(dev))
        image, classifier = image.contiguous(), classifier.contiguous()
        index = index.to(torch.int64)
        label = self._labels[index.cpu()]
        return {"image": image, "classifier_input": classifier,
                "label": label.to(dev, non_blocking=non_blocking),
                "index": index.to(dev, non_blocking=non_blocking)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self.source)}, batches={len(self)}, "
                f"resolution={self.resolution}, classifier_size={self.classifier_size}, "
                f"train={self.train}, rank={self.rank}/{self.world_size}, device={self.device})")
