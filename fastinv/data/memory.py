"""Decode once, serve batches from memory: for datasets that fit in RAM (the demo's 12,000
images at 32 px are 36 MB as uint8), the decoding a loader repeats every epoch is the largest
cost of a small model's step on CPU. ``MemoryLoader`` runs one evaluation pass of any
``make_loader`` loader (DALI or PIL, whole images, bad files skipped and counted there), keeps
the decoded uint8 images, and then yields the same batch dicts as the loaders do: shuffled per
epoch with the loaders' plan (``fastinv.data.plan.epoch_order``, so sharding and
``set_epoch(e, start_batch=k)`` mean the same), with a seeded horizontal flip.

Crops other than the whole image would need the files again: use the streaming loaders then.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastinv.data.base import ImageLoader
from fastinv.data.plan import epoch_order, num_batches


class MemoryLoader(ImageLoader):
    """An ``ImageLoader`` over decoded images in RAM (``bad_files``, ``classes``, ``epoch`` and
    ``set_epoch`` are the base class's; the epoch plan counts the decoded images)."""

    backend = "memory"

    def __init__(self, decoder, *, batch_size: int, train: bool = True, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = True, flip: bool = True):
        """``decoder``: a ``make_loader(..., train=False)`` loader over the whole split (one
        rank); it is iterated once here."""
        if decoder.train:
            raise ValueError("MemoryLoader decodes with an evaluation loader (train=False): "
                             "whole images, every file once")
        # ImageLoader.__init__ is not called: crops and normalisation are the decoder's, done
        # once in this loop; only the base class's epoch bookkeeping and properties are shared
        images, cls, index = [], [], []
        for batch in decoder:  # normalised floats -> uint8 levels (the loaders' exact inverse)
            images.append(((batch["image"].cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
            cls.append(batch["classifier_input"].cpu())
            index.append(batch["index"].cpu())
        if not images:
            raise ValueError(f"no image could be decoded from {decoder.source.root}")
        self.images = torch.cat(images)
        # classifier inputs stay float (their normalisation is the classifier's), as fp16: half
        # the memory, and well inside the 8-bit levels' precision
        self.classifier_inputs = torch.cat(cls).to(torch.float16)
        self.index = torch.cat(index)
        self.labels = torch.from_numpy(decoder.source.labels)[self.index]
        self.source, self.device = decoder.source, decoder.device
        self.resolution, self.classifier_size = decoder.resolution, decoder.classifier_size
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.drop_last, self.flip = rank, world_size, drop_last, flip
        self._epoch, self._start_batch = 0, 0
        self.logits: torch.Tensor | None = None  # (2, N, classes) once cache_logits ran

    @torch.no_grad()
    def cache_logits(self, classifier_fn, batch_size: int = 256) -> None:
        """Compute ``classifier_fn(classifier_input)`` once for every image, as stored and
        mirrored (the two views a batch can serve), and serve it with each batch as
        ``"logits"``. For a frozen classifier these are the logits a training step would
        compute from the batch's ``classifier_input`` (to the rounding of the batch size)."""
        dev, out = self.device, []
        for view in (lambda t: t, lambda t: t.flip(3)):
            out.append(torch.cat([
                classifier_fn(view(self.classifier_inputs[i: i + batch_size].to(dev).float())).float()
                for i in range(0, len(self.classifier_inputs), batch_size)]))
        self.logits = torch.stack(out)

    def __len__(self) -> int:
        return num_batches(len(self.images), rank=self.rank, world_size=self.world_size,
                           batch_size=self.batch_size, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, start = self._epoch, self._start_batch
        self._epoch, self._start_batch = epoch + 1, 0
        batches = epoch_order(len(self.images), train=self.train, seed=self.seed, epoch=epoch,
                              rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, drop_last=self.drop_last)
        flips = np.random.default_rng([self.seed, epoch, 7]).random(len(self.images)) < 0.5
        flips &= self.train and self.flip
        dev = self.device
        for rows in batches[start:]:
            r = torch.from_numpy(rows)
            img = self.images[r].to(dev).float().div_(127.5).sub_(1.0)
            cls = self.classifier_inputs[r].to(dev).float()
            f = torch.from_numpy(flips[rows]).to(dev).view(-1, 1, 1, 1)
            batch = {"image": torch.where(f, img.flip(3), img),
                     "classifier_input": torch.where(f, cls.flip(3), cls),
                     "label": self.labels[r].to(dev), "index": self.index[r].to(dev)}
            if self.logits is not None:
                rd = r.to(dev)
                batch["logits"] = torch.where(f.view(-1, 1), self.logits[1, rd], self.logits[0, rd])
            yield batch
