"""BigGAN generator conditioned on a classifier's logits instead of a one-hot class.

``G(logits, noise)`` -> image in [-1, 1]. The logits go through a spectral-normed linear
embedding (BigGAN's "shared" embedding); the noise is split hierarchically: its first chunk
feeds the input linear layer, every residual block gets ``cat(shared(logits), chunk_i)`` as the
condition of its conditional batch norms. Self-attention sits after the block that reaches
``attention_resolution``. Architecture and init follow BigGAN-PyTorch (Brock et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastinv.models import layers
from fastinv.models.layers import LayerFactory

# resolution -> (channel multipliers in, channel multipliers out) of the residual blocks;
# each block doubles the resolution, starting from a 4x4 map.
G_ARCH: dict[int, tuple[list[int], list[int]]] = {
    16: ([4, 4], [4, 4]),
    32: ([4, 4, 4], [4, 4, 4]),
    64: ([16, 16, 8, 4], [16, 8, 4, 2]),
    128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1]),
    256: ([16, 16, 8, 8, 4, 2], [16, 8, 8, 4, 2, 1]),
}
BOTTOM = 4


class GBlock(nn.Module):
    """CBN -> ReLU -> up -> conv3x3 -> CBN -> ReLU -> conv3x3, plus an upsampled 1x1 shortcut.
    Each CBN -> ReLU is one layer (``relu=True``): fastinv fuses the ReLU into the CBN's
    kernels, torch's layers apply it after the batch norm."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, bn_eps: float, sn_eps: float,
                 make: LayerFactory):
        super().__init__()
        self.bn1 = make.conditional_bn(in_ch, cond_dim, eps=bn_eps, relu=True)
        self.conv1 = make.sn_conv2d(in_ch, out_ch, 3, 1, sn_eps)
        self.bn2 = make.conditional_bn(out_ch, cond_dim, eps=bn_eps, relu=True)
        self.conv2 = make.sn_conv2d(out_ch, out_ch, 3, 1, sn_eps)
        self.conv_sc = make.sn_conv2d(in_ch, out_ch, 1, 0, sn_eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = layers.upsample2(self.bn1(x, cond))  # bn1, bn2: CBN then ReLU
        h = self.conv1(h)
        h = self.conv2(self.bn2(h, cond))
        # BigGAN's shortcut is conv_sc(up(x)); a 1x1 convolution commutes with nearest
        # upsampling, so up(conv_sc(x)) is the same function with the convolution on a
        # quarter of the pixels
        return h + layers.upsample2(self.conv_sc(x))


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that fixes a Generator's architecture (what a checkpoint stores, as
    ``dataclasses.asdict``); the fields are ``Generator``'s arguments, in their order."""

    num_classes: int
    resolution: int = 128
    ch: int = 96
    noise_dim: int = 120
    shared_dim: int = 128
    attention_resolution: int = 64
    logit_preprocess: str = "none"
    logit_temperature: float = 1.0
    bn_eps: float = 1e-5
    sn_eps: float = 1e-6
    layers: str = "fastinv"
    cond_input: bool = False
    shared_mlp: bool = False
    full_res_ch: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        """A stored config (checkpoint ``model_config["G"]``); see ``layers.config_from_dict``."""
        return layers.config_from_dict(cls, d)


class Generator(nn.Module):
    """Logit-conditioned BigGAN generator: ``Generator(GeneratorConfig(...))``, or the config's
    fields as arguments (``Generator(10, resolution=32, ch=8)``).

    Args (the fields of :class:`GeneratorConfig`):
        num_classes: length of the logit vector (the classifier's output size).
        resolution: output size, one of 16, 32, 64, 128, 256.
        ch: channel width multiplier (BigGAN-128 uses 96).
        noise_dim: requested noise size; rounded down to a multiple of (blocks + 1).
        shared_dim: size of the logit embedding fed to every block.
        attention_resolution: resolution of the self-attention block (0: none).
        logit_preprocess / logit_temperature: see ``layers.LogitPreprocess``.
        layers: ``fastinv`` (fused spectral norm / conditional batch norm) or ``torch``
            (torch's own layers, same numerics; the benchmark baseline).
        cond_input: the "conditioned G input" option: the input linear layer reads
            ``cat(noise chunk, shared(logits))`` (BigGAN-deep's input) so the 4x4 map the
            blocks start from already depends on the logits; False is BigGAN (noise only,
            the logits reach G only through the batch norms' gains and biases).
        shared_mlp: the "MLP logit embedding" option: ``shared`` is linear -> ReLU -> linear
            (hidden width ``shared_dim``) instead of one linear map. A one-hot class needs
            no more than BigGAN's linear embedding; what logits carry beyond the class can
            be class-dependent (on the synthetic shapes, a shape's size is a different
            direction of the logits for each class), which one linear map cannot unmix.
        full_res_ch: the "narrow full-resolution block" option: the channels of the last
            block (the one that draws at the output resolution) and of the output layer; 0 is
            BigGAN's table (``ch`` x its multiplier). At 32 px that block is ~3/4 of G's
            multiply-adds: half its width halves them (a float32 demo step 0.195 s against
            0.244 s, for a slower early curve: benchmarks/RESULTS.md Demo round 31).
    """

    def __init__(self, config: GeneratorConfig | int | None = None, /, *args, **kwargs):
        super().__init__()
        self.config = c = layers.model_config(GeneratorConfig, config, args, kwargs, "Generator")
        self._build(c.num_classes, c.resolution, c.ch, c.noise_dim, c.shared_dim,
                    c.attention_resolution, c.logit_preprocess, c.logit_temperature,
                    c.bn_eps, c.sn_eps, c.cond_input, layers.for_implementation(c.layers),
                    c.shared_mlp, c.full_res_ch)

    def _build(self, num_classes, resolution, ch, noise_dim, shared_dim, attention_resolution,
               logit_preprocess, logit_temperature, bn_eps, sn_eps, cond_input, make,
               shared_mlp=False, full_res_ch=0):
        if resolution not in G_ARCH:
            raise ValueError(f"Generator resolution must be one of {sorted(G_ARCH)}, got {resolution}")
        if num_classes < 1 or ch < 1 or shared_dim < 1:
            raise ValueError("Generator num_classes, ch and shared_dim must be positive")
        if full_res_ch < 0:
            raise ValueError(f"Generator full_res_ch must be >= 0 (0: BigGAN's), got {full_res_ch}")
        ins, outs = G_ARCH[resolution]
        # each block's output channels (a block reads the previous one's)
        widths = [m * ch for m in outs]
        if full_res_ch:
            widths[-1] = full_res_ch
        slots = len(ins) + 1
        if noise_dim < slots:
            raise ValueError(f"Generator noise_dim must be >= {slots} (one chunk per block + 1), "
                             f"got {noise_dim}")
        self.cond_input = cond_input
        self.num_classes, self.resolution = num_classes, resolution
        self.chunk = noise_dim // slots
        self.noise_dim = self.chunk * slots
        cond_dim = shared_dim + self.chunk

        self.preprocess = layers.LogitPreprocess(logit_preprocess, logit_temperature, num_classes)
        self.shared = (nn.Sequential(make.sn_linear(num_classes, shared_dim, sn_eps), nn.ReLU(),
                                     make.sn_linear(shared_dim, shared_dim, sn_eps))
                       if shared_mlp else make.sn_linear(num_classes, shared_dim, sn_eps))
        self.linear = make.sn_linear(self.chunk + (shared_dim if cond_input else 0), ins[0] * ch * BOTTOM * BOTTOM, sn_eps)
        widths_in = [ins[0] * ch, *widths[:-1]]
        self.blocks = nn.ModuleList()
        self.attention = nn.ModuleDict()
        res = BOTTOM
        for i, (ci, co) in enumerate(zip(widths_in, widths)):
            self.blocks.append(GBlock(ci, co, cond_dim, bn_eps, sn_eps, make))
            res *= 2
            if res == attention_resolution:
                self.attention[str(i)] = make.self_attention(co, sn_eps)
        self.output_bn = nn.BatchNorm2d(widths[-1], eps=bn_eps)
        self.output_conv = make.sn_conv2d(widths[-1], 3, 3, 1, sn_eps)
        layers.init_orthogonal(self)
        layers.attach_spectral_norm_group(self)

    def sample_noise(self, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """Standard normal noise ``(batch, noise_dim)`` on G's device (or ``device``)."""
        if device is None:
            device = generator.device if generator is not None else next(self.parameters()).device
        return torch.randn(batch, self.noise_dim, generator=generator, device=device)

    def forward(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"Generator expects logits of shape (N, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        if noise.shape != (logits.shape[0], self.noise_dim):
            raise ValueError(f"Generator expects noise of shape ({logits.shape[0]}, "
                             f"{self.noise_dim}), got {tuple(noise.shape)}; use G.sample_noise")
        shared = self.shared(self.preprocess(logits))
        zs = noise.split(self.chunk, dim=1)
        first = torch.cat([zs[0], shared], dim=1) if self.cond_input else zs[0]
        h = self.linear(first).view(logits.shape[0], -1, BOTTOM, BOTTOM)
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([shared, zs[i + 1]], dim=1))
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
        h = torch.relu(self.output_bn(h))
        return torch.tanh(self.output_conv(h))
