"""The "Φ feature statistics" option: G's image must give the frozen classifier Φ the same
per-channel feature statistics as the image whose logits G was given.

For each tapped layer of Φ, the statistic of an image is the spatial mean and standard
deviation of every channel (the quantities AdaIN and style losses use). They are position-free:
where an object sits or how it is rotated hardly moves them, so the term does not pull G to a
blurry average of positions the way pixel L1 does (the logits do not fix position). Unlike the
logit-consistency term, which G met with one small patch that Φ's global max pooling reads,
means and spreads at every scale are set by the whole image: a patch has the wrong ones.

``auto`` taps, for each spatial size Φ's maps take, the last leaf module of that size (for the
demo's SmallCNN: ``features.5`` at 32 px, ``features.12`` at 16, ``features.19`` at 8).
"""

from __future__ import annotations

import torch

from fastinv.train.phi_taps import PhiFeatures, leaf_maps


def channel_stats(feat: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 2C): each channel's spatial mean and standard deviation (fp32)."""
    f = feat.float().flatten(2)
    return torch.cat([f.mean(2), f.var(2, unbiased=False).add(1e-6).sqrt()], dim=1)


def stats_loss(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the relative squared error ‖s(x̂) - s(x)‖² / ‖s(x)‖² (batch-summed),
    so that every layer counts the same whatever its activation scale."""
    if len(fake) != len(real) or not fake:
        raise ValueError("stats_loss needs the same, non-zero number of layers for both")
    terms = [(f - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-12) for f, r in zip(fake, real)]
    return torch.stack(terms).mean()


class PhiStats:
    """:class:`PhiFeatures` taps on named modules of Φ; a call returns each tapped layer's
    :func:`channel_stats`."""

    def __init__(self, classifier, layers: str, resolution: int):
        if layers == "auto":
            last_of_size: dict[int, str] = {}
            for name, h, _ in leaf_maps(classifier, resolution):
                last_of_size[h] = name  # forward order: the last module of each size wins
            if not last_of_size:
                raise ValueError("optim.phi_stats_layers=auto: the classifier has no module "
                                 "with a (N, C, H, W) output; name its layers")
            layers = ",".join(dict.fromkeys(last_of_size[s]
                                            for s in sorted(last_of_size, reverse=True)))
        self.taps = PhiFeatures(classifier, layers, option="optim.phi_stats_layers")
        self.layers = self.taps.layers

    @property
    def _out(self) -> dict:  # what the hooks hold between calls (nothing)
        return self.taps._out

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> one (N, 2C) statistics tensor per tapped layer."""
        return [channel_stats(f) for f in self.taps(images)[1:]]
