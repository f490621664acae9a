"""Folding a frozen classifier's batch norms into its convolutions (fastinv.models.fold): the
same outputs and input gradients in float64, module names kept, and only the pairs that can
fold (a convolution read elsewhere, tapped, called twice, or a training-mode batch norm stays)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastinv.models.classifiers import load_classifier
from fastinv.models.fold import fold_batch_norms
from fastinv.train.phi_taps import PhiFeatures


def _random_stats(net: nn.Module) -> nn.Module:
    """Batch norms with statistics and affine parameters far from the identity, so a fold
    that dropped or misplaced one would show."""
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net


def _values_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("arch", ["small_cnn", "small_resnet"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_folded_classifier_matches_in_float64(arch, layout):
    torch.manual_seed(0)
    clf = load_classifier(f"fastinv:{arch}", random_init=True)
    _random_stats(clf.net)
    clf.double()
    folded = copy.deepcopy(clf).channels_last(layout == "channels_last")
    names = folded.fold_batch_norm()
    convs = [n for n, m in clf.net.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == convs  # every convolution of both nets is followed by its batch norm
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.net.modules())
    assert [n for n, _ in folded.net.named_modules()] == [n for n, _ in clf.net.named_modules()]
    for n in names:
        w = folded.net.get_submodule(n).weight
        assert not w.requires_grad
        if w.shape[-1] > 1:  # a 1x1 kernel is contiguous in both layouts
            assert w.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
            assert w.is_contiguous() == (layout == "nchw")
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    (a, ga), (b, gb) = _values_and_grads(clf, x), _values_and_grads(folded, x)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)


def test_taps_by_name_see_the_same_maps_after_folding():
    """A batch norm's slot (now an Identity) and the ReLU after it give what they gave; a
    convolution named in ``keep`` stays unfolded, so its own output is still its own."""
    torch.manual_seed(1)
    clf = load_classifier("fastinv:small_cnn", random_init=True)
    _random_stats(clf.net)  # float32: PhiFeatures feeds Φ classifier_input's float32 images
    folded = copy.deepcopy(clf)
    assert "features.4" not in folded.fold_batch_norm(keep={"features.4"})
    assert isinstance(folded.net.get_submodule("features.5"), nn.BatchNorm2d)
    layers = "features.1,features.2,features.4,features.10"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for ref, got in zip(PhiFeatures(clf, layers)(x), PhiFeatures(folded, layers)(x)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class _Skip(nn.Module):
    """conv -> bn where the convolution's output is read twice (a skip), then a shared pair
    called twice: neither may fold. The last pair can."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c3, self.b3 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.c1(x)
        x = self.b1(y) + y
        x = self.b2(self.c2(self.b2(self.c2(x))))
        return self.b3(self.c3(x))


def test_only_exclusive_single_use_pairs_fold():
    net = _random_stats(_Skip()).double().eval()
    ref = copy.deepcopy(net)
    assert fold_batch_norms(net) == ["c3"]
    assert isinstance(net.b1, nn.BatchNorm2d) and isinstance(net.b2, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-12, atol=1e-12)


def test_training_mode_and_untraceable_nets_are_left_alone():
    net = _Skip().train()
    assert fold_batch_norms(net) == []

    class Branchy(nn.Module):  # data-dependent control flow: FX cannot trace it
        def __init__(self):
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.b(self.c(x)) if x.sum() > 0 else x

    net = Branchy().eval()
    assert fold_batch_norms(net) == [] and isinstance(net.b, nn.BatchNorm2d)


def test_convolution_variants_and_plain_batch_norms_fold_exactly():
    """A biased, grouped, strided, dilated convolution and a batch norm without affine
    parameters fold to the same values and input gradients (float64)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                        nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
    net = _random_stats(net).double().eval()
    ref = copy.deepcopy(net)
    assert fold_batch_norms(net) == ["0", "3"]
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    (a, ga), (b, gb) = _values_and_grads(ref, x), _values_and_grads(net, x)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)
