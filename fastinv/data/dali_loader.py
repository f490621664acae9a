"""The DALI loader: nvJPEG decoding on the GPU (``mixed``), or a CPU-only DALI pipeline.

Pipeline: ``external_source`` (file bytes, crop box, flip, index) -> ``decoders.image_slice``
(decodes only the crop's region where the codec allows) -> two ``resize`` (antialiased
bilinear, like the PIL loader) -> ``crop_mirror_normalize`` (flip, HWC -> CHW, normalise to [-1, 1] and to the classifier's mean/std, float32), on the
GPU for a ``mixed`` pipeline, in DALI's threads for a CPU one.

Why an ``external_source`` and not ``readers.file``: the Python side already owns the epoch
plan (fastinv.data.plan), so both backends shuffle, shard (rank ``r`` of ``w`` — DALI's
``shard_id`` / ``num_shards``) and crop identically, ``set_epoch`` can jump to any epoch, and
``index`` comes out exactly. Reading the bytes is cheap next to decoding; a plain
(non-parallel) ``external_source`` needs no ``if __name__ == "__main__"`` guard in scripts.

Bad files: the scan (fastinv.data.sources) keeps corrupt files out of the plan. If a batch
still fails inside DALI, that batch is decoded by the PIL path instead (which skips and
reports the culprit), the pipeline is rebuilt, and the epoch goes on from the next batch.
EXIF orientation is ignored in both backends (``adjust_orientation=False``) so they agree.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from fastinv.data.base import ImageLoader
from fastinv.data.pil_loader import decode_crop

log = logging.getLogger("fastinv.data")


class _BatchFeed:
    """The callable behind ``external_source``: pops the next planned batch, or ends the epoch."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.queue: deque = deque()

    def __call__(self):
        if not self.queue:
            raise StopIteration
        index, boxes, flips = self.queue.popleft()
        data = []
        for i in index:
            with open(self.paths[i], "rb") as fh:
                data.append(np.frombuffer(fh.read(), dtype=np.uint8))
        return (data,
                [b[:2].astype(np.int32) for b in boxes],
                [b[2:].astype(np.int32) for b in boxes],
                [np.array(f, dtype=np.int32) for f in flips],
                [np.array(i, dtype=np.int64) for i in index])


def _build_pipeline(feed: _BatchFeed, *, batch_size: int, num_threads: int,
                    device_id: int | None, resolution: int, classifier_size: int, seed: int,
                    mean_std: tuple[tuple[list[float], list[float]], ...]):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=2)
    def pipe():
        data, anchor, shape, flip, index = fn.external_source(
            source=feed, num_outputs=5, batch=True,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT64])
        crops = fn.decoders.image_slice(
            data, anchor, shape, device="mixed" if gpu else "cpu", output_type=types.RGB,
            axis_names="WH", normalized_anchor=False, normalized_shape=False,
            adjust_orientation=False)
        outs = []
        for size, (mean, std) in zip((resolution, classifier_size), mean_std):
            resized = fn.resize(crops, size=[size, size], interp_type=types.INTERP_LINEAR,
                                antialias=True)
            outs.append(fn.crop_mirror_normalize(resized, mirror=flip, dtype=types.FLOAT,
                                                 output_layout="CHW", mean=mean, std=std))
        return outs[0], outs[1], index

    p = pipe()
    p.build()
    return p


class DaliLoader(ImageLoader):
    backend = "dali"

    def __init__(self, source, *, num_threads: int, **kwargs):
        super().__init__(source, **kwargs)
        self.num_threads = num_threads
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self._feed = _BatchFeed(source.paths)
        self._pipe = None
        self._dirty = False

    def _new_pipeline(self):
        self._feed.queue.clear()
        self._pipe = _build_pipeline(
            self._feed, batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self.device_id, resolution=self.resolution,
            classifier_size=self.classifier_size, seed=self.seed, mean_std=self._mean_std())

    def _mean_std(self):
        """``(level - mean) / std`` for the image ([-1, 1]) and the classifier input."""
        img_scale, img_shift, cls_scale, cls_shift = self._affine()
        return tuple(([float(v) for v in -shift / scale], [float(v) for v in 1 / scale])
                     for scale, shift in ((img_scale, img_shift), (cls_scale, cls_shift)))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, batches = self._start_epoch()
        plan = []
        for index in batches:
            boxes, flips = self._boxes(index, epoch)
            plan.append((index, boxes, flips))
        if self._pipe is None or self._dirty:
            # the last iteration was abandoned mid-epoch: its prefetched batches are still
            # queued inside the pipeline, so start from a fresh one
            self._new_pipeline()
        self._feed.queue.clear()
        self._feed.queue.extend(plan)
        self._dirty = True
        done = 0
        while done < len(plan):
            try:
                image, cls, index = self._pipe.run()
            except StopIteration:
                break
            except Exception as exc:  # a file DALI cannot decode: redo this batch with PIL
                log.warning("DALI failed on a batch (%s: %s); decoding it with PIL instead",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._pipe = None  # a pipeline that raised is not reused
                batch = self._pil_batch(*plan[done])
                done += 1
                if batch is not None:
                    yield batch
                self._new_pipeline()
                self._feed.queue.extend(plan[done:])
                continue
            done += 1
            dev = self.device
            yield self._finish(_to_torch(image, dev), _to_torch(cls, dev), _to_torch(index, dev))
        if self._pipe is not None:
            self._pipe.reset()  # end the external source's epoch: the next one starts clean
            self._dirty = False

    def _pil_batch(self, index, boxes, flips):
        good, images, classifier = [], [], []
        for i, box, flip in zip(index, boxes, flips):
            try:
                image, cls = decode_crop(self.source.paths[i], box, bool(flip),
                                         (self.resolution, self.classifier_size))
            except Exception as exc:
                self.bad_files.add(self.source.paths[i], f"{type(exc).__name__}: {exc}")
                continue
            good.append(int(i))
            images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
            classifier.append(torch.from_numpy(np.array(cls)).permute(2, 0, 1))
        if not good:
            return None
        return self._finish(torch.stack(images), torch.stack(classifier),
                            torch.tensor(good, dtype=torch.int64))


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> a torch tensor (a copy: DALI reuses its buffers)."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    if isinstance(tensor_list, TensorListGPU):
        with torch.cuda.device(device):
            out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(dense))
