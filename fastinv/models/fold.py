"""Folding a frozen network's eval-mode batch norms into the convolutions before them.

In eval mode ``bn(conv(x))`` is one convolution with weight ``W·γ/√(var+ε)`` and bias
``(b − mean)·γ/√(var+ε) + β``: the same values (to rounding) with one op less forward and
backward. The trainer runs the frozen classifiers on every image of a step (Φ's logits, D's
feature maps of reals and fakes, G's gradient through them), where SmallCNN's six batch norms
cost ~4.5 ms of a ~73 ms ``demo-cpu`` step (forward 2.7, backward 1.9 in the profile of
RESULTS.md issue 11 round 13).

Which pairs fold is read from the network's traced graph (``torch.fx``), not its attribute
names: a batch norm folds when its only input is a convolution's output that nothing else
reads, each module is called once, and the convolution is not in ``keep`` (a tapped
convolution's own output would change). Module names do not move: the convolution's slot
holds the folded convolution, the batch norm's an ``nn.Identity`` whose output is what the
batch norm gave, so hooks registered afterwards by name (fastinv.train.phi_taps) still see
the same maps. A network FX cannot trace (TorchScript, data-dependent control flow) is left
as it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fold_batch_norms(net: nn.Module, keep: Iterable[str] = ()) -> list[str]:
    """Fold, in place, every eval-mode ``BatchNorm2d`` of ``net`` that directly follows a
    ``Conv2d`` into that convolution; returns the folded convolutions' names."""
    keep = set(keep)
    try:
        graph = fx.symbolic_trace(net).graph
    except Exception:  # noqa: BLE001 - untraceable: nothing folds, the network still works
        return []
    modules = dict(net.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.training or bn.running_var is None:
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" \
            else None
        if (type(conv) is not nn.Conv2d or conv.training or len(src.users) != 1
                or src.target in keep or calls[src.target] != 1 or calls[node.target] != 1):
            continue
        fused = fuse_conv_bn_eval(conv, bn)  # keeps the weight's strides (channels_last too)
        for p in fused.parameters():  # a bias it creates follows the weight
            p.requires_grad_(conv.weight.requires_grad)
        _set(net, src.target, fused)
        _set(net, node.target, nn.Identity())
        folded.append(src.target)
    return folded
