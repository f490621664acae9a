"""R1 regularisation of D on real images (fastinv/train/regularizers.py): the exact value on
discriminators with known gradients, and the same loss and parameter gradients through
fastinv's fused layers as through torch's own."""

from __future__ import annotations

import pytest
import torch

from fastinv.models.discriminator import Discriminator
from fastinv.train.regularizers import r1_due, r1_loss, r1_penalty


def test_r1_penalty_of_a_linear_discriminator_is_half_the_squared_weight_norm():
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    z = torch.randn(5, 2, dtype=torch.float64)
    pen = r1_penalty(lambda x, z: (x * w).sum((1, 2, 3)) + z.sum(1), x, z)
    torch.testing.assert_close(pen, 0.5 * w.pow(2).sum())


def test_r1_penalty_is_the_batch_mean_and_differentiable_in_d_parameters():
    c = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    pen = r1_penalty(lambda x, z: 0.5 * c * x.pow(2).sum((1, 2, 3)), x, torch.zeros(4, 1))
    # grad_x D = c x  ->  0.5 * mean_n c² ||x_n||²,  d/dc = c * mean_n ||x_n||²
    sq = x.pow(2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(pen, 0.5 * c.detach() ** 2 * sq)
    (gc,) = torch.autograd.grad(pen, c)
    torch.testing.assert_close(gc, c.detach() * sq)


def test_r1_penalty_does_not_touch_the_input_batch():
    x = torch.randn(2, 1, 2, 2, requires_grad=True)
    r1_penalty(lambda x, z: x.pow(2).sum((1, 2, 3)), x, torch.zeros(2, 1)).backward()
    assert x.grad is None


def test_lazy_r1_loss_scales_gamma_by_the_interval():
    x, z = torch.randn(3, 1, 2, 2), torch.zeros(3, 1)

    def D(x, z):
        return x.pow(2).sum((1, 2, 3))

    torch.testing.assert_close(r1_loss(D, x, z, gamma=0.5, every=16), 8 * r1_penalty(D, x, z))
    assert [r1_due(s, 4) for s in range(6)] == [True, False, False, False, True, False]


@pytest.mark.parametrize(("kwargs", "match"), [(dict(gamma=-1.0), "gamma must be >= 0"),
                                               (dict(gamma=1.0, every=0), "every must be >= 1")])
def test_r1_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        r1_loss(lambda x, z: x.sum((1, 2, 3)), torch.randn(2, 1, 2, 2), torch.zeros(2, 1), **kwargs)


def test_r1_penalty_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="non-empty batch"):
        r1_penalty(lambda x, z: x.sum((1, 2, 3)), torch.randn(0, 1, 2, 2), torch.zeros(0, 1))


def test_r1_on_fastinv_layers_matches_torch_layers():
    """The BigGAN D on fused SN layers (C++ kernels, double backward through the op) and on
    torch's spectral_norm, same weights: same penalty and same parameter gradients."""
    torch.manual_seed(0)
    kw = dict(num_classes=5, resolution=16, ch=4, attention_resolution=8)
    ref, fused = Discriminator(layers="torch", **kw), Discriminator(**kw)  # float32 (D casts logits)
    fused.load_state_dict(ref.state_dict())  # torch's SN layout converts on load
    x, z = torch.randn(3, 3, 16, 16), torch.randn(3, 5)
    pen_ref, pen = r1_loss(ref, x, z, 10.0, 4), r1_loss(fused, x, z, 10.0, 4)
    torch.testing.assert_close(pen, pen_ref, rtol=1e-4, atol=0)
    pen_ref.backward()
    pen.backward()
    grads_ref = {n.replace(".parametrizations.weight.original", ".weight_orig"): p.grad
                 for n, p in ref.named_parameters()}
    scale = max(g.abs().max().item() for g in grads_ref.values() if g is not None)
    for n, p in fused.named_parameters():
        if grads_ref[n] is None:  # e.g. attention gamma = 0 paths
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n
            continue
        assert p.grad is not None, f"{n}: no gradient from the penalty"
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-3, atol=1e-5 * scale, msg=n)
