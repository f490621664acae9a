"""BigGAN discriminator with projection conditioning on the classifier's logits.

``D(x, logits) = linear(h) + <embed(logits), h>`` where ``h`` is the ReLU'd, spatially summed
feature of the residual trunk (summed as in BigGAN, or averaged: ``pool``) and ``embed`` is a spectral-normed linear map of the logits
(Miyato & Koyama 2018's projection, with the logit vector in place of a one-hot class).

Optionally (``phi_channels > 0``, the "Φ-feature D" option) D also reads a feature map of the
frozen classifier Φ at one of its trunk's resolutions: a spectral-normed 1x1 convolution of it
is added to the trunk's activation there (the projected-GAN idea, Sauer et al. 2021, with Φ's
own features). D then sees where in the image Φ finds class evidence, so G cannot meet Φ's
logits with one small patch: the whole feature map has to look like a real image's.

Optionally (``mbstd_group > 0``, the "minibatch std" option, Karras et al. 2018) the last
block's input gets one more channel: the standard deviation of the features over groups of
``mbstd_group`` consecutive images, averaged to one number per group. A G that draws the same
image for every noise (mode collapse) gives groups of fakes a std near 0 that no group of
reals has, so D can score the collapse itself.

Optionally (``space_to_depth``, the "space-to-depth D input" option) D reads the image as its
2 x 2 pixel blocks, 12 channels at half the resolution, and its first block does not pool: the
same trunk sizes with no convolution at full resolution (a step 1.2x faster in float32 and in
bf16, but less of the size drawn with the within-class head: benchmarks/RESULTS.md Demo rounds
37-38; the demo's --quick preset uses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastinv.models import layers
from fastinv.models.layers import LayerFactory

POOLS = ("sum", "mean", "sqrt")  # spatial pooling of D's last feature map

# resolution -> (channel multipliers in, out, downsample per block); the first "in" is RGB.
D_ARCH: dict[int, tuple[list[int], list[int], list[bool]]] = {
    16: ([0, 4, 4], [4, 4, 4], [True, False, False]),
    32: ([0, 4, 4, 4], [4, 4, 4, 4], [True, True, False, False]),
    64: ([0, 1, 2, 4, 8], [1, 2, 4, 8, 16], [True, True, True, True, False]),
    128: ([0, 1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 16], [True] * 5 + [False]),
    256: ([0, 1, 2, 4, 8, 8, 16], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False]),
}


def trunk_sizes(resolution: int) -> tuple[int, ...]:
    """The feature map sizes after each of D's blocks at ``resolution`` px (where Φ's features
    can join the trunk)."""
    sizes, res = [], resolution
    for d in D_ARCH[resolution][2]:
        res //= 2 if d else 1
        sizes.append(res)
    return tuple(dict.fromkeys(sizes))


def minibatch_std(h: torch.Tensor, group: int) -> torch.Tensor:
    """``h`` (N, C, H, W) with one channel more: per group of ``group`` consecutive images
    (``gcd(N, group)`` when N is not a multiple), the std over the group of each feature,
    averaged over C, H, W. Groups are consecutive so that D's one call on
    ``cat([reals, fakes])`` never mixes the two when the batch is a multiple of the group."""
    n, c, hh, ww = h.shape
    g = math.gcd(n, group)
    if g < 2:  # a single image: no spread to measure
        return torch.cat([h, h.new_zeros(n, 1, hh, ww)], dim=1)
    y = h.float().view(n // g, g, c, hh, ww)
    std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (N / g,)
    std = std.repeat_interleave(g).to(h.dtype).view(n, 1, 1, 1).expand(n, 1, hh, ww)
    return torch.cat([h, std], dim=1)


class DBlock(nn.Module):
    """(ReLU) -> conv3x3 -> ReLU -> conv3x3 -> (avgpool), plus a 1x1 shortcut when needed."""

    def __init__(self, in_ch: int, out_ch: int, downsample: bool, preactivation: bool,
                 sn_eps: float, make: LayerFactory):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = make.sn_conv2d(in_ch, out_ch, 3, 1, sn_eps)
        self.conv2 = make.sn_conv2d(out_ch, out_ch, 3, 1, sn_eps)
        learnable = in_ch != out_ch or downsample
        self.conv_sc = make.sn_conv2d(in_ch, out_ch, 1, 0, sn_eps) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x) if self.preactivation else x
        h = self.conv2(torch.relu(self.conv1(h)))
        if self.preactivation:
            # BigGAN pools h and conv_sc(x) separately; average pooling is linear, so one
            # pool of their sum is the same function with one pass over the output, not two
            h = h + (self.conv_sc(x) if self.conv_sc is not None else x)
            return layers.downsample2(h) if self.downsample else h
        # not pre-activated (D's first block): the shortcut pools first, on the narrow input
        if self.downsample:
            h, x = layers.downsample2(h), layers.downsample2(x)
        return h + (self.conv_sc(x) if self.conv_sc is not None else x)


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Everything that fixes a Discriminator's architecture (what a checkpoint stores, as
    ``dataclasses.asdict``); the fields are ``Discriminator``'s arguments, in their order.
    ``phi_channels`` / ``phi_resolution``: an int each for one Φ map (0: none), equal-length
    lists for several."""

    num_classes: int
    resolution: int = 128
    ch: int = 96
    attention_resolution: int = 64
    logit_preprocess: str = "none"
    logit_temperature: float = 1.0
    sn_eps: float = 1e-6
    layers: str = "fastinv"
    pool: str = "sum"
    phi_channels: int | list[int] = 0
    phi_resolution: int | list[int] = 0
    logit_head: bool = False
    mbstd_group: int = 0
    # the "narrow full-resolution block" option: the output channels of D's first block (the
    # one that reads the image at full resolution; at 32 px ~60% of D's multiply-adds before
    # it pools); 0: BigGAN's table (ch x its multiplier)
    full_res_ch: int = 0
    # the "within-class head" option: the logit head also regresses each logit's deviation
    # from its Φ class's mean, in units of that class's std (num_classes more outputs; the
    # class statistics are buffers, set once by the trainer: set_class_statistics)
    head_within: bool = False
    # the "space-to-depth D input" option: D reads the image as its 2 x 2 pixel blocks
    # (pixel_unshuffle: 4 x 3 channels at half the resolution) and its first block does not
    # pool, so the trunk has the same sizes with no convolution at full resolution. Every
    # pixel still reaches D (nothing is averaged away, unlike reading a downsampled image).
    space_to_depth: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> DiscriminatorConfig:
        """A stored config (checkpoint ``model_config["D"]``); see ``layers.config_from_dict``."""
        return layers.config_from_dict(cls, d)


class Discriminator(nn.Module):
    """Projection discriminator ``D(x, logits) -> (N,)`` scores (higher = more real):
    ``Discriminator(DiscriminatorConfig(...))`` or the config's fields as arguments."""

    def __init__(self, config: DiscriminatorConfig | int | None = None, /, *args, **kwargs):
        super().__init__()
        self.config = c = layers.model_config(DiscriminatorConfig, config, args, kwargs, "Discriminator")
        num_classes, resolution, ch, sn_eps, pool = c.num_classes, c.resolution, c.ch, c.sn_eps, c.pool
        mbstd_group, logit_head = c.mbstd_group, c.logit_head
        if pool not in POOLS:
            raise ValueError(f"Discriminator pool must be one of {POOLS}, got {pool!r}")
        if mbstd_group < 0 or mbstd_group == 1:
            raise ValueError(f"Discriminator mbstd_group must be 0 (off) or >= 2, got {mbstd_group}")
        if c.full_res_ch < 0:
            raise ValueError(f"Discriminator full_res_ch must be >= 0 (0: BigGAN's), got {c.full_res_ch}")
        self.mbstd_group = mbstd_group
        make = layers.for_implementation(c.layers)
        self._build(num_classes, resolution, ch, c.attention_resolution, c.logit_preprocess,
                    c.logit_temperature, sn_eps, make)
        self._build_phi(c.phi_channels, c.phi_resolution, sn_eps, make)
        # "D logit head" (ACGAN-style, Odena et al. 2017, regressing logits): predicts
        # the (preprocessed) logits from the pooled feature, trained on real images
        outs = num_classes * (2 if c.head_within else 1)
        self.head = make.sn_linear(self.widths[-1], outs, sn_eps) if logit_head else None
        if c.head_within:
            if not logit_head:
                raise ValueError("Discriminator head_within needs logit_head=True")
            self.register_buffer("class_mean", torch.zeros(num_classes, num_classes))
            self.register_buffer("class_std", torch.ones(num_classes, num_classes))
        layers.init_orthogonal(self)
        layers.attach_spectral_norm_group(self)
        self.pool = pool

    def _build(self, num_classes, resolution, ch, attention_resolution, logit_preprocess,
               logit_temperature, sn_eps, make: LayerFactory):
        if resolution not in D_ARCH:
            raise ValueError(f"Discriminator resolution must be one of {sorted(D_ARCH)}, got {resolution}")
        self.num_classes, self.resolution = num_classes, resolution
        outs = D_ARCH[resolution][1]
        res, down = self._trunk(resolution)
        # each block's output channels (a block reads the previous one's; the first, RGB)
        self.widths = [m * ch for m in outs]
        if self.config.full_res_ch:
            self.widths[0] = self.config.full_res_ch
        self.preprocess = layers.LogitPreprocess(logit_preprocess, logit_temperature, num_classes)
        self.blocks = nn.ModuleList()
        self.attention = nn.ModuleDict()
        for i, (co, d) in enumerate(zip(self.widths, down)):
            cin = (12 if self.config.space_to_depth else 3) if i == 0 else self.widths[i - 1]
            if i == len(self.widths) - 1 and self.mbstd_group:
                cin += 1  # the minibatch-std channel
            self.blocks.append(DBlock(cin, co, d, i > 0, sn_eps, make))
            res //= 2 if d else 1
            if res == attention_resolution and str(i) not in self.attention and d:
                self.attention[str(i)] = make.self_attention(co, sn_eps)
        self.linear = make.sn_linear(self.widths[-1], 1, sn_eps)
        self.embed = make.sn_linear(num_classes, self.widths[-1], sn_eps, bias=False)

    def _trunk(self, resolution: int) -> tuple[int, list[bool]]:
        """The size the first block reads and whether each block pools: D_ARCH's row, or with
        space-to-depth the first block's pooling done by pixel_unshuffle before it (every
        row's first block pools, so the sizes after each block are the same)."""
        down = D_ARCH[resolution][2]
        if self.config.space_to_depth:
            return resolution // 2, [False, *down[1:]]
        return resolution, down

    def _build_phi(self, channels, resolution, sn_eps: float, make: LayerFactory) -> None:
        """One spectral-normed 1x1 conv per Φ map (``channels``/``resolution``: an int each for
        one map, equal-length sequences for several), added after the block of that size."""
        chans = [channels] if isinstance(channels, int) else list(channels)
        sizes = [resolution] if isinstance(resolution, int) else list(resolution)
        if len(chans) != len(sizes):
            raise ValueError(f"phi_channels {chans} and phi_resolution {sizes} differ in length")
        self.phi_blocks: list[int] = []  # index of the block after which each map joins
        self.phi_in = nn.ModuleList()
        if chans == [0]:
            return
        start, down = self._trunk(self.resolution)
        for c, size in zip(chans, sizes):
            block, res = None, start
            for i, d in enumerate(down):
                res //= 2 if d else 1
                if res == size:
                    block = i
                    break
            if block is None or c <= 0:
                raise ValueError(f"Φ's feature map is {c} x {size}x{size}, but D's trunk at "
                                 f"{self.resolution} px never has that size; tap another Φ layer")
            self.phi_blocks.append(block)
            self.phi_in.append(make.sn_conv2d(c, self.widths[block], 1, 0, sn_eps))

    def set_class_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Row c: the mean and std of the preprocessed logits over training images of Φ class
        c (what ``within_class`` measures deviations against)."""
        if not self.config.head_within:
            raise ValueError("this Discriminator has no within-class head (head_within=False)")
        self.class_mean.copy_(mean)
        self.class_std.copy_(std)

    def within_class(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, num_classes): each preprocessed logit's deviation from the mean of its Φ class
        (argmax), over that class's std: the part of the logits beyond the class, on the scale
        of the class part (the within-class head's target)."""
        cls = logits.argmax(1)
        return (self.preprocess(logits).float() - self.class_mean[cls]) / self.class_std[cls]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before several Φ maps held one conv at "phi_in." (now "phi_in.0.")
        old = prefix + "phi_in."
        for key in [k for k in state_dict if k.startswith(old) and not k[len(old)].isdigit()]:
            state_dict[old + "0." + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, logits: torch.Tensor, *phi: torch.Tensor,
                head: bool = False, head_detach: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``phi``: Φ's feature maps, one per map D was built to read, in that order. With
        ``head`` (a D built with ``logit_head``) also the head's (N, num_classes) prediction of
        the preprocessed logits ((N, 2 num_classes) with ``head_within``: then the within-class
        deviations, see ``within_class``)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or logits.shape[0] != x.shape[0]:
            raise ValueError(f"Discriminator expects logits of shape ({x.shape[0]}, "
                             f"{self.num_classes}), got {tuple(logits.shape)}")
        if len(phi) != len(self.phi_in):
            raise ValueError(f"this Discriminator reads {len(self.phi_in)} Φ feature map(s): "
                             f"pass them after the logits (got {len(phi)})")
        h = F.pixel_unshuffle(x, 2) if self.config.space_to_depth else x
        for i, block in enumerate(self.blocks):
            if i == len(self.blocks) - 1 and self.mbstd_group:
                h = minibatch_std(h, self.mbstd_group)
            h = block(h)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
            for k, b in enumerate(self.phi_blocks):
                if b == i:
                    h = h + self.phi_in[k](phi[k].to(h.dtype))
        h = torch.relu(h)
        h_area = h.shape[2] * h.shape[3]
        h = h.sum(dim=(2, 3))
        if self.pool != "sum":  # mean: / HW; sqrt: / sqrt(HW), between the two
            h = h / (h_area if self.pool == "mean" else math.sqrt(h_area))
        proj = (self.embed(self.preprocess(logits)).to(h.dtype) * h).sum(dim=1)
        score = self.linear(h).squeeze(1) + proj
        if not head:
            return score
        if self.head is None:
            raise ValueError("this Discriminator has no logit head (build it with logit_head=True)")
        # head_detach: the head's gradient stops at the pooled feature, so a head loss trains
        # the head alone and leaves the trunk to the real/fake score
        return score, self.head(h.detach() if head_detach else h)
