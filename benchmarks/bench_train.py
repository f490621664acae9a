"""Inverter training throughput: images/s through the discriminator, per implementation.

    python benchmarks/bench_train.py --device cpu              # demo-cpu config
    python benchmarks/bench_train.py --device cuda             # BigGAN-128 config (H100/H200)
    pytest benchmarks/bench_train.py -s                        # the same, for the devices present

Implementations (each in its own process: FASTINV_BACKEND is read at import):
  reference-eager  fastinv's layers with every op served by its pure-PyTorch reference
  torch-eager      torch's own layers (parametrized spectral norm, batch norm + linears)
  torch.compile    torch's layers, G and D under torch.compile
  fastinv          fastinv's layers and compiled kernels (C++ on CPU, CUDA on GPU)
  fastinv+compile  the same, G and D under torch.compile around fastinv's ops (they trace)

The data are in-memory random batches (decoding is not what this measures); the classifier is
randomly initialised (its forward pass is part of every step, as in real training). A "step" is
one generator update with its ``d_steps`` discriminator updates; images/s counts real images
through D: batch * d_steps * accumulate / step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

IMPLS = {
    "reference-eager": ({"FASTINV_BACKEND": "reference"}, "fastinv", False),
    "torch-eager": ({}, "torch", False),
    "torch.compile": ({}, "torch", True),
    "fastinv": ({}, "fastinv", False),
    "fastinv+compile": ({}, "fastinv", True),
}
CASES = {
    "cpu": ("demo-cpu", ["--random_init=true", "--num_classes=10"]),
    "cuda": ("imagenet-128", ["--random_init=true", "--batch_size=64"]),
}


class MemoryLoader:
    """A few fixed random batches, cycled: the loader interface without decoding."""

    def __init__(self, batch_size, resolution, classifier_size, device, batches=4):
        import torch

        g = torch.Generator().manual_seed(0)
        self.data = [{
            "image": (torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1).to(device),
            "classifier_input": torch.randn(batch_size, 3, classifier_size, classifier_size,
                                            generator=g).to(device),
        } for _ in range(batches)]
        self.start = 0

    def __len__(self):
        return len(self.data)

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch  # the trainer's loader interface (BatchStream resumes mid-epoch)

    def __iter__(self):
        return iter(self.data[self.start:])


def worker(args) -> dict:
    import torch

    from fastinv.models.classifiers import load_classifier
    from fastinv.train.config import load_config
    from fastinv.train.distributed import DistInfo, resolve_device
    from fastinv.train.gan import InverterTrainer

    preset, over = CASES[args.device]
    cfg = load_config(preset, over + [f"--device={args.device}", f"--layers={args.layers}",
                                      f"--compile={args.compile}", "--out_dir=/tmp/bench_train",
                                      *args.override])
    device = resolve_device(args.device)
    c = cfg.classifier
    clf = load_classifier(c.spec, random_init=True, num_classes=c.num_classes)
    loader = MemoryLoader(cfg.data.batch_size, cfg.data.resolution, clf.input_size, device)
    trainer = InverterTrainer(cfg, DistInfo(device=device), loader=loader, classifier=clf)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    warm = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    # the fastest step: other processes only ever add time, so on a shared machine the minimum
    # is the steadiest estimate of what a step costs (the median is reported next to it)
    step, median = min(times), sorted(times)[len(times) // 2]
    cpu_step = sorted(cpu)[len(cpu) // 2]
    o = cfg.optim
    images = cfg.data.batch_size * o.d_steps * o.accumulate
    return {"config": preset, "batch": cfg.data.batch_size, "step_s": step, "median_s": median,
            "img_per_s": images / step, "img_per_cpu_s": images / cpu_step, "warmup_s": warm,
            "threads": torch.get_num_threads()}


def run_all(device: str, impls: list[str], steps: int, warmup: int, override: list[str],
            rounds: int = 1) -> list:
    """Each implementation ``rounds`` times, interleaved; the round with the fastest step wins."""
    best: dict[str, dict | None] = {}
    for _ in range(rounds):
        for name, r in _run_round(device, impls, steps, warmup, override):
            if name not in best or (r and (best[name] is None or r["step_s"] < best[name]["step_s"])):
                best[name] = r
    return list(best.items())


def _run_round(device: str, impls: list[str], steps: int, warmup: int, override: list[str]) -> list:
    rows = []
    for name in impls:
        env_extra, layers, compile_ = IMPLS[name]
        env = dict(os.environ, **env_extra)
        cmd = [sys.executable, __file__, "--worker", "--device", device, "--layers", layers,
               "--compile", str(compile_).lower(), "--steps", str(steps), "--warmup", str(warmup),
               *[f"--override={o}" for o in override]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append((name, None))
            continue
        rows.append((name, json.loads(proc.stdout.strip().splitlines()[-1])))
    return rows


def print_table(device: str, rows: list) -> None:
    base = {n: r for n, r in rows}.get("reference-eager")
    comp = {n: r for n, r in rows}.get("torch.compile")
    first = next((r for _, r in rows if r), None)
    if first:
        print(f"\ninverter training, {device}, {first['config']} config, batch {first['batch']}, "
              f"{first['threads']} threads (fastest step; median beside it)")
    print(f"{'impl':<18}{'step ms':>10}{'median':>9}{'img/s':>10}{'vs ref-eager':>14}"
          f"{'vs compile':>12}{'img/CPU-s':>11}{'warm-up s':>11}")
    for name, r in rows:
        if r is None:
            print(f"{name:<18}{'failed':>10}")
            continue
        vs = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        vc = f"{comp['step_s'] / r['step_s']:.2f}x" if comp else "-"
        print(f"{name:<18}{r['step_s'] * 1e3:>10.1f}{r['median_s'] * 1e3:>9.1f}"
              f"{r['img_per_s']:>10.1f}{vs:>14}{vc:>12}{r['img_per_cpu_s']:>11.2f}"
              f"{r['warmup_s']:>11.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=sorted(CASES), default="cpu")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ", ".join(IMPLS))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="run every implementation this many "
                   "times, interleaved, and keep each one's fastest round")
    p.add_argument("--override", action="append", default=[], help="config override, e.g. "
                   "--override=--batch_size=32 (repeatable)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layers", default="fastinv", help=argparse.SUPPRESS)
    p.add_argument("--compile", default="false", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = run_all(args.device, args.impls.split(","), args.steps, args.warmup, args.override,
                   args.rounds)
    print_table(args.device, rows)
    return 0 if all(r for _, r in rows) else 1


def _devices():
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_train_throughput(device):
    steps = int(os.environ.get("FASTINV_BENCH_TRAIN_STEPS", "5"))
    rows = run_all(device, list(IMPLS), steps, 2, [])
    print_table(device, rows)
    assert all(r is not None for _, r in rows), "an implementation failed (see stderr)"


if __name__ == "__main__":
    sys.exit(main())
