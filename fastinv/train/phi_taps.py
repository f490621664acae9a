"""Taps on the frozen classifier Φ: its logits and the outputs of named modules from one forward
pass, for the options that read Φ's features (Φ-feature D, Φ feature statistics)."""

from __future__ import annotations

import torch

from fastinv.models.classifiers import Classifier


@torch.no_grad()
def leaf_maps(classifier: Classifier, resolution: int) -> list[tuple[str, int, int]]:
    """(name, H, W) of every leaf module with a (N, C, H, W) output, in forward order, for one
    ``resolution`` px image."""
    found: list[tuple[str, int, int]] = []

    def probe(name):
        def hook(module, args, output):
            if torch.is_tensor(output) and output.dim() == 4:
                found.append((name, int(output.shape[2]), int(output.shape[3])))
        return hook

    handles = [m.register_forward_hook(probe(n)) for n, m in classifier.net.named_modules()
               if n and not list(m.children())]
    try:
        device = next(iter(classifier.buffers()), torch.zeros(())).device
        classifier(classifier.prepare(torch.zeros(1, 3, resolution, resolution, device=device)))
    finally:
        for h in handles:
            h.remove()
    return found


class PhiFeatures:
    """Φ's logits and the outputs of some of its modules (by name) from one forward pass. The
    hooks record only during this object's own calls: Φ's other uses (the logits of a batch,
    another tap) leave nothing held."""

    def __init__(self, classifier: Classifier, layer: str, resolution: int = 0,
                 sizes: tuple[int, ...] = (), option: str = "model.d_phi_layer"):
        """``layer``: a module name, several comma-separated, ``"auto"``: the last module
        whose output is a square map of one of ``sizes`` (D's trunk sizes) for a
        ``resolution`` px image, i.e. Φ's deepest usable features, or ``"auto:each"``: the
        last such module of each size (one map per trunk size Φ has). ``option`` names the
        setting in error messages."""
        self.option = option
        if layer in ("auto", "auto:each"):
            found = [(n, h) for n, h, w in leaf_maps(classifier, resolution)
                     if h == w and h in sizes]
            if not found:
                raise ValueError(f"{option}={layer}: no module of classifier "
                                 f"{classifier.name!r} gives a square map of size {sizes} at "
                                 f"{resolution} px; name one with --{option}=NAME")
            if layer == "auto":
                layer = found[-1][0]
            else:  # forward order; a later module of a size replaces an earlier one
                last = {h: n for n, h in found}
                layer = ",".join(n for n, h in found if last[h] == n)
        self.layers = [n.strip() for n in layer.split(",") if n.strip()]
        if not self.layers:
            raise ValueError(f"{option} names no module")
        self.layer = self.layers[0]
        self.classifier, self._out, self._armed = classifier, {}, False
        for name in self.layers:
            try:
                module = classifier.net.get_submodule(name)
            except AttributeError:
                names = [n for n, _ in classifier.net.named_modules() if n][:40]
                raise ValueError(f"{option}={name!r} is not a module of classifier "
                                 f"{classifier.name!r}; its modules include {names}") from None
            module.register_forward_hook(self._keeper(name))

    def _keeper(self, name: str):
        def hook(module, args, output):
            if self._armed:
                self._out[name] = output
        return hook

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images in [-1, 1] -> (Φ's logits, then each tapped feature map in order)."""
        self._armed, self._out = True, {}
        try:
            logits = self.classifier(self.classifier.prepare(images))
        finally:
            self._armed = False
        feats, self._out = [self._out.get(n) for n in self.layers], {}
        for name, feat in zip(self.layers, feats):
            if not torch.is_tensor(feat) or feat.dim() != 4:
                raise ValueError(f"{self.option} {name!r} must name a module whose output is a "
                                 f"(N, C, H, W) feature map, got {type(feat).__name__}")
        return (logits, *feats)

    @torch.no_grad()
    def shapes(self, resolution: int, device) -> list[tuple[int, int]]:
        """(channels, size) of each tapped map for a ``resolution`` px image."""
        feats = self(torch.zeros(1, 3, resolution, resolution, device=device))[1:]
        for name, feat in zip(self.layers, feats):
            if feat.shape[2] != feat.shape[3]:
                raise ValueError(f"{self.option} {name!r} gives a non-square map "
                                 f"{tuple(feat.shape)}")
        return [(int(f.shape[1]), int(f.shape[2])) for f in feats]

    def shape(self, resolution: int, device) -> tuple[int, int]:
        """(channels, size) of the first tapped map."""
        return self.shapes(resolution, device)[0]
