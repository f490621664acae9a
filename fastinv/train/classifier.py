"""Train the project's own classifier pair on the synthetic data: the small ResNet, standard or
PGD adversarially trained (Madry et al. 2018) in L2 or L∞, as the robust vs non-robust pair
whose inverters the paper compares.

Attacks run in pixel space [0, 1] (ε in those units: L∞ 8/255, L2 0.5 are the usual choices),
the classifier normalises inside. The result is ``<out>.safetensors`` plus ``<out>.json``
(architecture, classes, normalisation, training settings, validation accuracies), which
``load_classifier("fastinv:small_resnet", weights=<out>.safetensors)`` reads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastinv.models.classifiers import FASTINV_ARCHS, fast_layout, save_small_resnet

NORMS = ("none", "l2", "linf")
OPTIMIZERS = ("sgd", "adamw")
SYMMETRY_AUGMENTS = ("none", "dihedral", "dihedral+rgb")


@dataclass
class ClassifierConfig:
    data: str = ""  # ImageFolder root with train/ (and val/)
    out: str = "runs/classifier/small_resnet.safetensors"
    arch: str = "small_resnet"  # small_resnet | small_cnn (the evaluation judge's architecture)
    input_size: int = 32
    width: int = 16
    blocks_per_stage: int = 2
    epochs: int = 10
    max_steps: int | None = None  # stop early after this many updates (tests, quick runs)
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adamw
    lr: float = 0.1  # the demo's small CPU runs use adamw with lr 2e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    # Training crops keep a random fraction in [crop_min_scale, 1] of the image area. A small
    # fraction can cut the one small shape of a synthetic image out of the crop (a wrong label).
    crop_min_scale: float = 0.35
    # "dihedral": also random 90° rotations and flips of each training image; "dihedral+rgb":
    # and a random order of its colour channels. Label-preserving only where rotation and
    # colours are nuisance factors, as in the synthetic shapes; there it multiplies the data.
    symmetry_augment: str = "none"  # none | dihedral | dihedral+rgb
    # decode the training split once and serve it from RAM (whole images: crop_min_scale=1)
    in_memory: bool = False
    # Start from these small-ResNet weights (.safetensors of the same width/blocks/classes), e.g.
    # PGD fine-tuning of a standard model: from scratch, few PGD steps stay at chance.
    init_weights: str = ""
    adversarial: str = "none"  # none | l2 | linf
    eps: float = 0.5
    pgd_steps: int = 7
    step_size: float | None = None  # None: 2.5 * eps / pgd_steps (Madry et al.)
    seed: int = 0
    device: str = "auto"
    # none | bf16 | auto (bf16 autocast where the device computes it natively; see
    # fastinv/train/precision.py): the forward passes, PGD's included
    amp: str = "none"
    backend: str = "auto"
    workers: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def validate(self) -> None:
        if not self.data:
            raise ValueError("ClassifierConfig.data is empty: pass --data DIR (an ImageFolder "
                             "root, e.g. from `fastinv data synth`)")
        if self.arch not in FASTINV_ARCHS:
            raise ValueError(f"arch must be one of {sorted(FASTINV_ARCHS)}, got {self.arch!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        if self.symmetry_augment not in SYMMETRY_AUGMENTS:
            raise ValueError(f"symmetry_augment must be one of {SYMMETRY_AUGMENTS}, "
                             f"got {self.symmetry_augment!r}")
        from fastinv.train.precision import AMP_MODES

        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.in_memory and self.crop_min_scale != 1:
            raise ValueError("in_memory serves whole images: set crop_min_scale=1")
        if self.adversarial not in NORMS:
            raise ValueError(f"adversarial must be one of {NORMS}, got {self.adversarial!r}")
        if self.adversarial != "none" and not (self.eps > 0 and self.pgd_steps >= 1):
            raise ValueError("adversarial training needs eps > 0 and pgd_steps >= 1")
        for name in ("input_size", "width", "blocks_per_stage", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def pgd_attack(model, x01: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int,
               step_size: float, normalize, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy within the ``norm`` ball of radius
    ``eps`` around ``x01`` (images in [0, 1]); returns the adversarial images in [0, 1]."""
    if norm == "linf":  # random start inside the box
        delta = (torch.rand(x01.shape, generator=generator, device=x01.device) * 2 - 1) * eps
    else:
        delta = torch.zeros_like(x01)
    delta = (x01 + delta).clamp(0, 1) - x01
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(normalize(x01 + delta)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "linf":
                delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
            else:
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta + step_size * g
                scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
                delta = delta * scale.view(-1, 1, 1, 1)
            delta = (x01 + delta).clamp(0, 1) - x01
    return (x01 + delta).detach()


def _loader(cfg: ClassifierConfig, split: Path, train: bool, device):
    from fastinv.data import make_loader

    common = dict(resolution=cfg.input_size, classifier_size=cfg.input_size,
                  classifier_mean=cfg.mean, classifier_std=cfg.std, backend=cfg.backend,
                  device=device, num_workers=cfg.workers)
    if train and cfg.in_memory:
        from fastinv.data.memory import MemoryLoader

        return MemoryLoader(make_loader(split, batch_size=256, train=False, **common),
                            batch_size=cfg.batch_size, seed=cfg.seed)
    return make_loader(split, batch_size=cfg.batch_size, train=train, seed=cfg.seed,
                       drop_last=train, crop_scale=(cfg.crop_min_scale, 1.0), **common)


def evaluate(model, loader, cfg: ClassifierConfig, *, adversarial: bool) -> float:
    """Top-1 accuracy on ``loader`` (under the configured PGD attack if ``adversarial``)."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    model.eval()
    correct = total = 0
    for batch in loader:
        x, y = batch["classifier_input"], batch["label"]
        m, s = mean.to(x.device), std.to(x.device)
        if adversarial:
            x01 = x * s + m
            x = (pgd_attack(model, x01, y, norm=cfg.adversarial, eps=cfg.eps,
                            steps=cfg.pgd_steps, step_size=_step_size(cfg),
                            normalize=lambda t, m=m, s=s: (t - m) / s) - m) / s
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def symmetry_augment(x01: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Each image of the batch ``x01`` (B, 3, H, W) under a random element of the dihedral group
    of the square (``mode`` "dihedral"), and with randomly ordered colour channels
    ("dihedral+rgb"). Square images only."""
    if mode == "none":
        return x01
    b, dev = x01.shape[0], x01.device
    turns = torch.randint(0, 4, (b,), generator=generator, device=dev)
    out = x01.clone()
    for k in range(1, 4):
        idx = (turns == k).nonzero().flatten()
        out[idx] = torch.rot90(x01[idx], k, dims=(2, 3))
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)
    if mode == "dihedral+rgb":
        order = torch.rand(b, 3, generator=generator, device=dev).argsort(dim=1)
        out = out.gather(1, order.view(b, 3, 1, 1).expand_as(out))
    return out


def _step_size(cfg: ClassifierConfig) -> float:
    return cfg.step_size if cfg.step_size is not None else 2.5 * cfg.eps / cfg.pgd_steps


def train_classifier(cfg: ClassifierConfig) -> Path:
    """Train the small ResNet (or ``cfg.arch``); returns the written ``.safetensors`` path (sidecar next to it)."""
    from fastinv.data.sources import dataset_classes
    from fastinv.train.distributed import resolve_device
    from fastinv.train.optim import fused
    from fastinv.train.precision import autocast

    cfg.validate()
    root = Path(cfg.data)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if not train_dir.is_dir():
        raise FileNotFoundError(f"classifier data {root} does not exist; make it with "
                                "`fastinv data synth --out DIR` or pass an ImageFolder")
    val_dir = root / "val"
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    num_classes = len(dataset_classes(train_dir))
    model = FASTINV_ARCHS[cfg.arch](num_classes, cfg.width, cfg.blocks_per_stage)
    if cfg.init_weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cfg.init_weights))
    # channels_last on CPU (SmallCNN forward+backward 1.8x its NCHW speed, RESULTS.md issue 11)
    layout = fast_layout(device)
    model = model.to(device, memory_format=layout)
    train_loader = _loader(cfg, train_dir, True, device)
    steps = cfg.epochs * len(train_loader)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=fused(device))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=True, fused=fused(device))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    step, epoch = 0, 0
    while step < steps:
        train_loader.set_epoch(epoch)
        for batch in train_loader:
            x, y = batch["classifier_input"].to(device), batch["label"].to(device)
            if cfg.symmetry_augment != "none":
                x = (symmetry_augment(x * std + mean, cfg.symmetry_augment, gen) - mean) / std
            if cfg.adversarial != "none":
                model.eval()  # attack the current model without moving its BN statistics
                with autocast(cfg.amp, device):
                    x01 = pgd_attack(model, x * std + mean, y, norm=cfg.adversarial,
                                     eps=cfg.eps, steps=cfg.pgd_steps,
                                     step_size=_step_size(cfg),
                                     normalize=lambda t: (t - mean) / std, generator=gen)
                x = (x01 - mean) / std
            x = x.contiguous(memory_format=layout)
            model.train()
            with autocast(cfg.amp, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    extra = {"training": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in dataclasses.asdict(cfg).items()},
             "classes": dataset_classes(train_dir), "steps": step}
    if val_dir.is_dir() and any(val_dir.iterdir()):
        val = _loader(cfg, val_dir, False, device)
        extra["val_accuracy"] = evaluate(model, val, cfg, adversarial=False)
        if cfg.adversarial != "none":
            extra["val_robust_accuracy"] = evaluate(model, val, cfg, adversarial=True)
    model = model.cpu().to(memory_format=torch.contiguous_format)  # safetensors: contiguous
    return save_small_resnet(model, cfg.out, input_size=cfg.input_size, mean=cfg.mean,
                             std=cfg.std, extra=extra)
