"""Inverter checkpoints: atomic writes, loads that cannot run code, bit-for-bit resume.

A checkpoint is one ``torch.save`` file of plain containers (tensors, numbers, strings, lists,
dicts) so that ``torch.load(weights_only=True)`` reads it without unpickling code: G, D, the
EMA G, both optimisers, the step and data position, every RNG state (torch, CUDA, Python,
NumPy, and each rank's noise generator) and the config. It is written to a temporary file and
renamed over the target (``os.replace``), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

FORMAT = "fastinv-inverter-checkpoint"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def rng_state() -> dict:
    """This process's global RNG states, as weights-only-loadable containers."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), py[-1]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` (no code runs) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastinv inverter checkpoint")
    return ckpt


def resolve(path: str | Path) -> Path:
    """A checkpoint file from a file path or a run directory (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} has no checkpoints/step_*.pt; train with "
                                    "`fastinv train --out_dir=...` first")
        return found
    return path


def load_inverter(path: str | Path, device: str | torch.device = "cpu", ema: bool = True):
    """``(G, cfg)`` from a run directory or checkpoint: the EMA generator (or the live one
    with ``ema=False``), in eval mode, with its TrainConfig."""
    from fastinv.models.generator import Generator
    from fastinv.train.config import from_dict

    ckpt = load(resolve(path), device="cpu")
    cfg = from_dict(ckpt["config"])
    G = Generator(**ckpt["model_config"]["G"])
    G.load_state_dict(ckpt["G_ema" if ema else "G"])
    G.to(device).eval()
    for p in G.parameters():
        p.requires_grad_(False)
    return G, cfg
