"""Train the DeePSiM-style decoder: logits -> image with pixel + feature + adversarial losses.

Loss of the decoder (Dosovitskiy & Brox 2016):
``λ_pix ‖x̂ − x‖² + λ_feat ‖F(x̂) − F(x)‖² + λ_adv · BCE(D(x̂, z), real)``, where F is the frozen
classifier's last feature map before its linear head (the "comparator") and D a conditional
discriminator trained with BCE. Inputs are precomputed tensors (images in [-1, 1] and their
logits), which keeps this loop independent of the data pipeline.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fastinv.invert.metrics import to_classifier_input
from fastinv.io import atomic_save_safetensors, atomic_write_json
from fastinv.models.deepsim import DeepSimDecoder, DeepSimDiscriminator
from fastinv.train.optim import fused
from fastinv.train.precision import autocast, autocast_dtype


@dataclass
class DeepSimConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    width: int = 32
    lambda_pix: float = 1.0
    lambda_feat: float = 0.1
    lambda_adv: float = 0.01
    seed: int = 0
    log_every: int = 50
    # none | bf16 | auto: the forwards (decoder, D, comparator) under bf16 autocast where the
    # device computes bf16 natively (fastinv.train.precision); losses and weights in float32
    amp: str = "auto"


class ComparatorFeatures(nn.Module):
    """The classifier's input to its final linear layer (captured with a forward hook)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        net = getattr(classifier, "net", classifier)
        children = list(net.named_children())
        if len(children) < 2 or not isinstance(children[-1][1], nn.Linear):
            self.layer = None  # unknown layout: compare logits only
        else:
            self.layer = children[-2][1]
        self._captured: torch.Tensor | None = None
        self._hook = self.layer.register_forward_hook(self._capture) if self.layer else None

    def close(self) -> None:
        """Remove the hook from the classifier."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture(self, module, inputs, output):
        self._captured = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of images in [-1, 1]; features fall back to logits."""
        logits = self.classifier(to_classifier_input(images, self.classifier))
        feats = self._captured if self.layer is not None else logits
        self._captured = None
        return feats, logits


def train_deepsim(
    classifier: nn.Module,
    images: torch.Tensor,
    logits: torch.Tensor,
    out_dir: str | Path,
    cfg: DeepSimConfig | None = None,
    progress: bool = True,
) -> tuple[DeepSimDecoder, Path]:
    """Fit a decoder on (images, logits) pairs; writes deepsim.safetensors + deepsim.json + logs."""
    cfg = cfg or DeepSimConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = images.device
    autocast_dtype(cfg.amp, device)  # a bad amp fails here, before any work
    torch.manual_seed(cfg.seed)
    num_classes, resolution = logits.shape[1], images.shape[-1]
    # channels_last (as the factor regressor): faster convolutions on CPU; with bf16 autocast a
    # decoder + D step took 24 ms against 34 in fp32 NCHW (benchmarks/RESULTS.md Demo round 24)
    cl = torch.channels_last
    G = DeepSimDecoder(num_classes, resolution, cfg.width).to(device, memory_format=cl)
    G.set_statistics(logits)
    d_logits = G.standardise(logits)  # D sees them on G's scale
    D = DeepSimDiscriminator(num_classes, resolution, cfg.width).to(device, memory_format=cl)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.5, 0.999), fused=fused(device))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.5, 0.999), fused=fused(device))
    comparator = ComparatorFeatures(classifier)
    with torch.no_grad():
        target_feats = torch.cat([comparator(x)[0] for x in images.split(256)])

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tb"))
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="DeePSiM decoder", unit="step", leave=False)
    t0 = time.perf_counter()
    ones = torch.ones(cfg.batch_size, device=device)
    amp = functools.partial(autocast, cfg.amp, device)
    for step in steps:
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen).to(device)
        x, z, fx, zd = images[idx], logits[idx], target_feats[idx], d_logits[idx]
        x = x.contiguous(memory_format=cl)
        with amp():
            fake = G(z)
            d_real, d_fake = D(x, zd), D(fake.detach(), zd)
        # discriminator: real pairs vs decoded pairs
        d_loss = (F.binary_cross_entropy_with_logits(d_real.float(), ones)
                  + F.binary_cross_entropy_with_logits(d_fake.float(), torch.zeros_like(ones)))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # decoder
        with amp():
            feats, _ = comparator(fake)
            d_gen = D(fake, zd)
        fake = fake.float()
        pix = F.mse_loss(fake, x)
        feat = F.mse_loss(feats.float(), fx)
        adv = F.binary_cross_entropy_with_logits(d_gen.float(), ones)
        g_loss = cfg.lambda_pix * pix + cfg.lambda_feat * feat + cfg.lambda_adv * adv
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            for name, v in (("pix", pix), ("feat", feat), ("adv", adv), ("d", d_loss)):
                writer.add_scalar(f"deepsim/{name}", v.item(), step)
    writer.close()
    comparator.close()
    G.eval()
    path = out_dir / "deepsim.safetensors"
    atomic_save_safetensors(G.state_dict(), path)
    meta = dict(num_classes=num_classes, resolution=resolution, width=cfg.width,
                train_seconds=time.perf_counter() - t0, config=asdict(cfg))
    atomic_write_json(out_dir / "deepsim.json", meta)
    return G, path


def load_deepsim(path: str | Path, device: str | torch.device = "cpu") -> DeepSimDecoder:
    """Load a decoder written by ``train_deepsim`` (safetensors + json sidecar)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"{path} and {meta_path} are both needed; train with train_deepsim")
    meta = json.loads(meta_path.read_text())
    G = DeepSimDecoder(meta["num_classes"], meta["resolution"], meta["width"])
    G.load_state_dict(load_file(str(path)))
    return G.to(device).eval()
