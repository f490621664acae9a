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
from torch import nn


def auto_layers(net: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the last leaf module of each spatial size in one forward of ``example``."""
    last_of_size: dict[int, str] = {}

    def probe(name):
        def hook(module, args, output):
            if torch.is_tensor(output) and output.dim() == 4:
                last_of_size[int(output.shape[2])] = name
        return hook

    handles = [m.register_forward_hook(probe(n)) for n, m in net.named_modules()
               if n and not list(m.children())]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
    if not last_of_size:
        raise ValueError("optim.phi_stats_layers=auto: the classifier has no module with a "
                         "(N, C, H, W) output; name its layers with --optim.phi_stats_layers")
    return list(dict.fromkeys(last_of_size[s] for s in sorted(last_of_size, reverse=True)))


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
    """Forward hooks on named modules of a classifier's ``net``; ``classifier(images)`` through
    :meth:`__call__` returns each tapped layer's :func:`channel_stats`."""

    def __init__(self, classifier, layers: str, resolution: int):
        net = classifier.net
        if layers == "auto":
            device = next(iter(classifier.buffers()), torch.zeros(())).device
            names = auto_layers(net, classifier.prepare(
                torch.zeros(1, 3, resolution, resolution, device=device)))
        else:
            names = [n.strip() for n in layers.split(",") if n.strip()]
        if not names:
            raise ValueError("optim.phi_stats_layers names no layer")
        self.layers, self.classifier = names, classifier
        self._out: dict[str, torch.Tensor] = {}
        for n in names:
            try:
                module = net.get_submodule(n)
            except AttributeError:
                raise ValueError(f"optim.phi_stats_layers: {n!r} is not a module of classifier "
                                 f"{classifier.name!r}") from None
            module.register_forward_hook(self._keeper(n))
        self._armed = False

    def _keeper(self, name: str):
        def hook(module, args, output):
            if self._armed:  # only this object's own calls: Φ also runs for logits and D
                self._out[name] = output
        return hook

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> one (N, 2C) statistics tensor per tapped layer."""
        self._armed, self._out = True, {}
        try:
            self.classifier(self.classifier.prepare(images))
        finally:
            self._armed = False
        out, self._out = self._out, {}
        missing = [n for n in self.layers if n not in out]
        if missing or any(not torch.is_tensor(out[n]) or out[n].dim() != 4 for n in self.layers):
            raise ValueError(f"optim.phi_stats_layers {self.layers}: each must output a "
                             f"(N, C, H, W) map in Φ's forward (missing or not 4-D: {missing})")
        return [channel_stats(out[n]) for n in self.layers]
