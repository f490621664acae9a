"""Where a step of ``fastinv train`` spends its time: a torch.profiler trace of the real CLI
loop (data path, classifier, G, D, losses, backward, Adam, EMA, logging, image grids,
checkpoints), grouped two ways.

    python benchmarks/profile_train.py                          # demo-cpu, random-init Φ
    python benchmarks/profile_train.py --steps 200 -- --model.layers=torch --run.compile=true
    python benchmarks/profile_train.py --device cuda --preset imagenet-128 -- --data.batch_size=64
    pytest benchmarks/profile_train.py                          # a seconds-long smoke run

1. **By phase**: the named ranges of ``InverterTrainer.train_step`` and the loop around it
   (``record_function`` scopes in fastinv/train/gan.py); "outside any range" is the Python
   loop itself (progress bar, step bookkeeping).
2. **By op family**: self time of every op inside the steps, summed by what it is
   (convolutions, fastinv's CBN / SN / hinge kernels, batch norm, Adam, copies, ...).

The first ``--warmup`` steps run untraced (allocator, oneDNN primitive caches, compilation);
the profiler then records ``--steps`` steps of the same run with the preset's own logging,
image and checkpoint cadence. Times are wall-clock on the calling thread, so run it alone on
a quiet machine. On CUDA the phase times are CPU-side launch times unless ``--sync`` is given
(a device sync at the end of every range would change what is measured; use the kernel table).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

# op name -> family, first match wins (substring tests on the aten / fastinv op name)
FAMILIES = (
    ("conditional_batch_norm", "CBN (fastinv)"),
    ("spectral_norm", "spectral norm (fastinv)"),
    ("hinge", "hinge loss (fastinv)"),
    ("convolution", "convolution fwd+bwd"),
    ("conv2d", "convolution fwd+bwd"),
    ("batch_norm", "batch norm (Φ, torch)"),
    ("native_batch_norm", "batch norm (Φ, torch)"),
    ("adam", "Adam"),
    ("_foreach", "foreach (Adam, EMA)"),
    ("addmm", "linear (matmul)"),
    ("mm", "linear (matmul)"),
    ("copy_", "copies / layout"),
    ("contiguous", "copies / layout"),
    ("cat", "copies / layout"),
    ("interpolate", "resize / pool"),
    ("upsample", "resize / pool"),
    ("pool", "resize / pool"),
    ("max_pool", "resize / pool"),
)
PHASES = ("data", "classifier", "G forward (D step)", "D forward", "D backward", "G forward",
          "G backward", "optimizer", "EMA", "logging", "image grid", "checkpoint")


def family(name: str) -> str:
    low = name.lower()
    for key, fam in FAMILIES:
        if key in low:
            return fam
    return "elementwise / other"


def _config(preset: str, steps: int, out_dir: Path, device: str, extra: list[str]):
    from fastinv.train.config import load_config

    overrides = [f"--run.steps={steps}", f"--run.out_dir={out_dir}", f"--run.device={device}",
                 "--run.progress=false", "--classifier.random_init=true",
                 "--classifier.num_classes=10", "--classifier.spec=fastinv:small_cnn", *extra]
    return load_config(preset, overrides)


def profile(preset: str, warmup: int, steps: int, device: str, extra: list[str],
            work: Path) -> dict:
    """Run ``warmup`` untraced steps, then trace ``steps`` more; returns both tables."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from fastinv.train.gan import train_inverter

    out = work / "run"
    t0 = time.perf_counter()
    train_inverter(_config(preset, warmup, out, device, extra))
    warm_s = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    cfg = _config(preset, warmup + steps, out, device, [*extra, "--run.resume=true"])
    with tprofile(activities=acts) as prof:
        train_inverter(cfg)
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    # the loop itself, without the resumed run's set-up (data scan, Φ's logit statistics)
    wall = next(e.cpu_time_total / 1e6 for e in events if e.key == "train loop")
    phase = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    ops = defaultdict(float)
    for e in events:
        if e.key in PHASES or e.key.startswith("ProfilerStep") or "#" in e.key:
            continue
        if e.key.startswith(("aten::", "fastinv::", "mkldnn::", "cudnn")):
            ops[family(e.key)] += e.self_cpu_time_total / 1e6
    return {"preset": preset, "device": device, "steps": steps, "warmup_s": warm_s,
            "wall_s": wall, "s_per_step": wall / steps, "phases": phase,
            "outside_ranges_s": max(wall - sum(phase.values()), 0.0), "op_families": dict(ops),
            "extra": extra, "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    wall, n = result["wall_s"], result["steps"]
    lines = [f"{n} steps in {wall:.2f} s ({1e3 * wall / n:.1f} ms/step, "
             f"{result['threads']} threads, {result['device']})", "",
             "| phase | ms/step | % of wall |", "|---|---:|---:|"]
    rows = sorted(result["phases"].items(), key=lambda kv: -kv[1])
    rows.append(("outside any range (Python loop, progress bar)", result["outside_ranges_s"]))
    lines += [f"| {k} | {1e3 * v / n:.2f} | {100 * v / wall:.1f} |" for k, v in rows]
    lines += ["", "| op family (self time) | ms/step | % of wall |", "|---|---:|---:|"]
    rows = sorted(result["op_families"].items(), key=lambda kv: -kv[1])
    rows.append(("not in an op (autograd engine, Python, hooks)",
                 max(wall - sum(result["op_families"].values()), 0.0)))
    lines += [f"| {k} | {1e3 * v / n:.2f} | {100 * v / wall:.1f} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after -- goes to the training config
        extra, argv = argv[argv.index("--") + 1:], argv[: argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo-cpu")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = profile(args.preset, args.warmup, args.steps, args.device, extra, Path(tmp))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def test_profile_train_smoke(tmp_path):
    """The whole path on the tiny preset (no time asserted)."""
    result = profile("tiny", 2, 3, "cpu", ["--data.synthetic_n=32"], tmp_path)
    assert result["steps"] == 3 and result["wall_s"] > 0
    assert {"D forward", "G backward", "optimizer"} <= set(result["phases"])
    assert "convolution fwd+bwd" in result["op_families"]
    assert "| phase |" in table(result)


if __name__ == "__main__":
    sys.exit(main())
