"""Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020): the same random
family of transforms is applied to real and generated images, every time D sees them, in D's
update and in G's. With a few thousand images D otherwise memorises the training set and stops
giving G a useful signal. The transforms are differentiable in the image, so G's gradient
flows through them; they never change what G is asked to produce.

Policies (comma-separated): ``translation`` (shift by up to 1/8 of the size, zero fill),
``cutout`` (a zeroed square of half the size at a random place), ``small_cutout`` (one of a
quarter of the size; both cut every image, or each with probability ``cutout_p``), ``color``
(brightness, saturation, contrast), ``flip`` (horizontal, half of the images), ``noise``
(Gaussian pixel noise, σ 0.1 on the [-1, 1] scale: instance noise, Sønderby et al. 2017; with
a Φ-feature D, Φ reads its maps of noisy images, so G's gradient through Φ is an average over
nearby images rather than Φ's sharpest local direction).

The same transforms serve the logit-consistency term (``optim.aux_augment``): Φ reads G's image
under a random transform, an expectation over transformations. A pattern that fools Φ at one
pixel alignment rarely survives a shift; what Φ reads at every shift is the shape it learned.
"""

from __future__ import annotations

import torch

POLICIES = ("translation", "cutout", "small_cutout", "color", "flip", "noise")


def parse_policy(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown}; choose from {POLICIES} "
                         "(comma-separated, or empty for none)")
    return names


def _rand(shape, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=x.device, dtype=torch.float32)


def color(x: torch.Tensor, gen=None) -> torch.Tensor:
    n = x.shape[0]
    x = x + (_rand((n, 1, 1, 1), x, gen) - 0.5).to(x.dtype)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((n, 1, 1, 1), x, gen) * 2).to(x.dtype) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((n, 1, 1, 1), x, gen) + 0.5).to(x.dtype) + mean  # contrast


def translation(x: torch.Tensor, ratio: float = 0.125, gen=None) -> torch.Tensor:
    n, c, h, w = x.shape
    sh, sw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    dy = (_rand((n, 1, 1), x, gen) * (2 * sh + 1)).long() - sh
    dx = (_rand((n, 1, 1), x, gen) * (2 * sw + 1)).long() - sw
    iy = torch.arange(h, device=x.device).view(1, h, 1) + dy  # source row of each output row
    ix = torch.arange(w, device=x.device).view(1, 1, w) + dx
    inside = ((iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)).unsqueeze(1)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    return out * inside.to(x.dtype)


def cutout(x: torch.Tensor, ratio: float = 0.5, gen=None) -> torch.Tensor:
    return _cutout(x, ratio, gen)[0]


def _cutout(x: torch.Tensor, ratio: float = 0.5, gen=None, p: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with a zeroed square of ``ratio`` of the side in each image chosen (each with
    probability ``p``; no extra draw at 1), and which images were chosen."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # top-left corner anywhere from half outside (top/left) to half outside (bottom/right)
    y0 = (_rand((n, 1, 1), x, gen) * (h + 1)).long() - ch // 2
    x0 = (_rand((n, 1, 1), x, gen) * (w + 1)).long() - cw // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
    if p < 1:
        chosen = _rand((n,), x, gen) < p
        hole = hole & chosen.view(n, 1, 1)
    else:
        chosen = torch.ones(n, dtype=torch.bool, device=x.device)
    return x * (~hole).unsqueeze(1).to(x.dtype), chosen


def flip(x: torch.Tensor, gen=None) -> torch.Tensor:
    mirror = _rand((x.shape[0], 1, 1, 1), x, gen) < 0.5
    return torch.where(mirror, x.flip(3), x)


def noise(x: torch.Tensor, sigma: float = 0.1, gen=None) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=gen, device=x.device,
                                   dtype=torch.float32).to(x.dtype)


# the cutout policies' hole sides, as fractions of the image's: ``small_cutout``'s quarter
# because a 16 px hole in a 32 px image hides much of a shape, and with it the size a D logit
# head should read off real images (RESULTS.md Demo round 32)
CUTOUT_RATIO = {"cutout": 0.5, "small_cutout": 0.25}
_FNS = {"translation": translation, "color": color, "flip": flip, "noise": noise}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], gen: torch.Generator | None = None,
                 cutout_p: float = 1.0) -> torch.Tensor:
    """``x`` under each transform of ``policy``, in the order given (identity for ``()``);
    a cutout policy cuts each image with probability ``cutout_p``."""
    return diff_augment_whole(x, policy, gen, cutout_p)[0]


def diff_augment_whole(x: torch.Tensor, policy: tuple[str, ...],
                       gen: torch.Generator | None = None, cutout_p: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``diff_augment`` and, per image, whether it was left whole by the cutout policies (all
    True without one). With ``cutout_p`` < 1 some images keep every pixel of the shape: the D
    logit head can be trained and read on those alone (optim.cutout_p)."""
    whole = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for name in policy:
        if name in CUTOUT_RATIO:
            x, chosen = _cutout(x, CUTOUT_RATIO[name], gen, cutout_p)
            whole = whole & ~chosen
        else:
            x = _FNS[name](x, gen=gen)
    return x, whole


def diff_augment_pair(a: torch.Tensor, b: torch.Tensor, policy: tuple[str, ...],
                      gen: torch.Generator, cutout_p: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (the same shape) under the same random transforms: image i of both
    gets the same shift, hole, flip, colour change and noise; and which images were left
    whole (as ``diff_augment_whole``). ``b`` replays ``a``'s draws from ``gen`` (the same
    shapes draw the same numbers), so ``gen`` ends where one ``diff_augment`` call would
    leave it."""
    if a.shape != b.shape:
        raise ValueError(f"diff_augment_pair needs two tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    start = gen.get_state()
    seen_a, whole = diff_augment_whole(a, policy, gen, cutout_p)
    gen.set_state(start)
    return seen_a, diff_augment(b, policy, gen, cutout_p), whole
