"""Data throughput: images/s of the DALI and PIL loaders, and of the synthetic generator.

Two kinds of source, both made on the spot (nothing is downloaded):
- ``synthetic``: the embedded dataset, 64 px JPEGs (``make_synthetic_dataset``);
- ``photos``: ImageNet-like JPEGs, random 400-560 px crops of scikit-learn's two photographs
  re-encoded at quality 90 (decoding dominates, as on ImageNet).

Each case runs one warm-up epoch (workers, pipeline build) and reports the best of the timed
epochs, as images per second delivered to the output device (train mode: random-resized
crop + flip, the target at ``resolution`` plus the classifier input at ``classifier_size``).
``img/CPU-s`` repeats the case in one process (PIL without workers, DALI with one thread)
and divides by the process's CPU time: the cost per image, independent of how loaded the
machine is (on a shared box wall-clock rates say more about the neighbours).

Run: ``python benchmarks/bench_data.py [--device cuda] [--backends pil,dali] [--n 512]``
or through pytest: ``pytest -s benchmarks/bench_data.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastinv.data import dali_available, make_loader, make_synthetic_dataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_photo_folder(out: Path, n: int, seed: int = 0) -> Path:
    import sklearn

    images = Path(sklearn.__file__).parent / "datasets" / "images"
    photos = [Image.open(images / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    for c in range(2):
        (out / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = photos[i % 2]
        w, h = int(rng.integers(400, 561)), int(rng.integers(300, 421))
        w, h = min(w, im.width), min(h, im.height)
        x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
        im.crop((x, y, x + w, y + h)).save(out / f"class{i % 2}" / f"{i:05d}.jpg", quality=90)
    return out


def throughput(root: Path, *, backend: str, resolution: int, classifier_size: int,
               batch_size: int, workers: int, device: str, epochs: int,
               clock=time.perf_counter) -> float:
    """Best images/s over ``epochs`` after a warm-up epoch, timed with ``clock``."""
    ld = make_loader(root, resolution=resolution, classifier_size=classifier_size,
                     classifier_mean=MEAN, classifier_std=STD, batch_size=batch_size,
                     train=True, backend=backend, device=device, num_workers=workers)
    for _ in ld:  # warm-up epoch
        pass
    best = 0.0
    for _ in range(epochs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = clock()
        n = 0
        for batch in ld:
            n += len(batch["index"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, n / (clock() - t0))
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="images per source")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default="pil,dali")
    p.add_argument("--resolutions", default="64,128")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="PIL worker processes / DALI threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (best is reported)")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if "dali" in backends and not dali_available():
        print("DALI is not installed here: benchmarking the PIL loader only.")
        backends.remove("dali")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fastinv_bench_data_"))
    try:
        t0 = time.perf_counter()
        synth = make_synthetic_dataset(tmp / "synth", n=args.n * 4, resolution=64,
                                       val_fraction=0.0, workers=args.workers)
        synth_rate = args.n * 4 / (time.perf_counter() - t0)
        photos = make_photo_folder(tmp / "photos", args.n)
        sources = {"synthetic 64px": (synth / "train", 64), "photos ~480x360": (photos, 224)}
        for name, (root, cls_size) in sources.items():
            for res in (int(r) for r in args.resolutions.split(",")):
                for backend in backends:
                    rate = throughput(root, backend=backend, resolution=res,
                                      classifier_size=cls_size, batch_size=args.batch_size,
                                      workers=args.workers, device=args.device,
                                      epochs=args.epochs)
                    # per CPU-second, in one process (PIL in-process, DALI one thread):
                    # the cost of an image, whatever else the machine is doing
                    per_cpu_s = throughput(root, backend=backend, resolution=res,
                                           classifier_size=cls_size,
                                           batch_size=args.batch_size, workers=0 if
                                           backend == "pil" else 1, device=args.device,
                                           epochs=args.epochs, clock=time.process_time)
                    rows.append(dict(source=name, backend=backend, resolution=res,
                                     classifier_size=cls_size, rate=rate, per_cpu_s=per_cpu_s))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ndata throughput on {args.device} ({args.workers} workers/threads, batch "
          f"{args.batch_size}, {args.n} images per source, train mode, best of {args.epochs})")
    print(f"{'source':<18}{'backend':<9}{'resolution':>11}{'classifier':>11}{'images/s':>11}"
          f"{'vs pil':>8}{'img/CPU-s':>11}")
    for r in rows:
        base = next((x["rate"] for x in rows if x["backend"] == "pil" and x["source"] ==
                     r["source"] and x["resolution"] == r["resolution"]), None)
        ratio = f"{r['rate'] / base:.2f}x" if base else "-"
        print(f"{r['source']:<18}{r['backend']:<9}{r['resolution']:>11}{r['classifier_size']:>11}"
              f"{r['rate']:>11.0f}{ratio:>8}{r['per_cpu_s']:>11.0f}")
    print(f"synthetic generator: {synth_rate:.0f} images/s (64 px, {args.workers} processes, "
          f"{args.n * 4} images incl. pool start-up)")
    return rows


def test_data_throughput():
    """pytest entry: a small run on the CPU (and the GPU when there is one); prints the table."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = main(["--n", "256", "--epochs", "1", "--device", device])
    assert rows and all(r["rate"] > 0 for r in rows)


if __name__ == "__main__":
    main()
