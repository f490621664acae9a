"""The logit-conditioned BigGAN generator, projection discriminator and self-attention."""

from __future__ import annotations

import pytest
import torch

from fastinv.models import layers
from fastinv.models.discriminator import Discriminator
from fastinv.models.generator import Generator
from fastinv.nn.attention import SelfAttention


def _g(**kw):
    args = dict(num_classes=5, resolution=16, ch=4, noise_dim=12, shared_dim=8,
                attention_resolution=0)
    args.update(kw)
    return Generator(**args)


@pytest.mark.parametrize("resolution,attention", [(16, 0), (32, 16), (64, 32)])
def test_generator_output_shape_and_range(resolution, attention):
    G = _g(resolution=resolution, ch=8 if resolution == 64 else 4, attention_resolution=attention)
    z = torch.randn(3, 5) * 10
    x = G(z, G.sample_noise(3))
    assert x.shape == (3, 3, resolution, resolution)
    assert x.abs().max() <= 1 and torch.isfinite(x).all()
    assert len(G.attention) == (1 if attention else 0)


def test_generator_noise_is_split_hierarchically():
    G = _g(noise_dim=13)  # 2 blocks + 1 -> chunks of 4, noise_dim rounded down to 12
    assert G.noise_dim == 12 and G.chunk == 4
    assert G.sample_noise(2).shape == (2, 12)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(G.sample_noise(2, generator=g1), G.sample_noise(2, generator=g2))


def test_generator_depends_on_logits_and_noise():
    G = _g().eval()
    z, e = torch.randn(2, 5), G.sample_noise(2)
    x = G(z, e)
    assert not torch.allclose(x, G(z + 1, e))
    assert not torch.allclose(x, G(z, G.sample_noise(2)))


def test_generator_rejects_bad_shapes():
    G = _g()
    with pytest.raises(ValueError, match=r"logits of shape \(N, 5\)"):
        G(torch.randn(2, 4), G.sample_noise(2))
    with pytest.raises(ValueError, match="use G.sample_noise"):
        G(torch.randn(2, 5), torch.randn(2, 7))
    with pytest.raises(ValueError, match="resolution must be one of"):
        Generator(5, resolution=48)


def test_discriminator_projection_uses_logits():
    D = Discriminator(5, resolution=16, ch=4)
    x, z = torch.randn(4, 3, 16, 16), torch.randn(4, 5)
    out = D(x, z)
    assert out.shape == (4,)
    assert not torch.allclose(out, D(x, z + torch.randn(4, 5)))
    with pytest.raises(ValueError, match="logits of shape"):
        D(x, torch.randn(3, 5))


def test_discriminator_projection_is_linear_in_embedding():
    D = Discriminator(5, resolution=32, ch=4, attention_resolution=16).eval()
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 5)
    base = D(x, torch.zeros(2, 5))  # embed has no bias: zero logits project to 0
    diff1, diff2 = D(x, z) - base, D(x, 2 * z) - base
    torch.testing.assert_close(diff2, 2 * diff1, rtol=1e-4, atol=1e-4)


def test_attention_starts_as_identity_and_learns_gamma():
    att = SelfAttention(16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = att(x)
    torch.testing.assert_close(y, x)
    y.square().sum().backward()
    assert att.gamma.grad is not None
    with torch.no_grad():
        att.gamma.fill_(1.0)
    assert not torch.allclose(att(x), x)
    with pytest.raises(ValueError, match="at least 8 channels"):
        SelfAttention(4)


def test_models_use_spectral_norm_and_orthogonal_init():
    G = _g()
    triples = list(layers._sn_triples(G))
    assert len(triples) >= 8  # shared, linear, 2 x (conv1, conv2, sc), CBN linears, output
    w = triples[0][0]  # orthogonal init: rows (or columns) orthonormal
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=1e-4)
    stats = layers.sigma_stats(G)
    assert stats["sigma_mean"] > 0


def test_logit_preprocess_modes():
    z = torch.randn(3, 6) * 5 + 2
    assert torch.equal(layers.LogitPreprocess("none")(z), z)
    s = layers.LogitPreprocess("standardise")(z)
    torch.testing.assert_close(s.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(layers.LogitPreprocess("temperature", 2.0)(z), z / 2)
    with pytest.raises(ValueError, match="logit_preprocess must be one of"):
        layers.LogitPreprocess("softmax")


def test_generator_trains_with_gradients_everywhere():
    G = _g(resolution=32, attention_resolution=16)
    D = Discriminator(5, resolution=32, ch=4, attention_resolution=16)
    z = torch.randn(4, 5)
    D(G(z, G.sample_noise(4)), z).mean().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None]
    assert missing == ["attention.1.gamma"] or missing == []  # gamma=0 still gets a gradient


@pytest.mark.parametrize("net", ["G", "D"])
def test_fastinv_layers_match_torch_layers(net):
    """The same weights through fastinv's fused SN / CBN layers and through torch's own:
    same outputs (training mode: one power iteration each) and same weight gradients.

    In float64: G's ReLUs make the weight gradients discontinuous in the activations, and in
    fp32 a pre-activation within ~1e-6 of 0 (the two paths' rounding apart) takes one path's
    gradient through and the other's not; which elements sit there depends on the CPU's
    instruction set (seen with AVX-512: one flipped ReLU moved G's gradients by 6e-4 of their
    scale). fp32 parity of each op is tested op by op, where no kink lies between."""
    torch.manual_seed(0)
    if net == "G":
        kw = dict(num_classes=5, resolution=32, ch=4, noise_dim=12, shared_dim=8,
                  attention_resolution=16)
        ref, fused = Generator(layers="torch", **kw), Generator(**kw)
        args = (torch.randn(4, 5), ref.sample_noise(4))
    else:
        kw = dict(num_classes=5, resolution=32, ch=4, attention_resolution=16)
        ref, fused = Discriminator(layers="torch", **kw), Discriminator(**kw)
        args = (torch.randn(4, 3, 32, 32), torch.randn(4, 5))
    ref, fused, args = ref.double(), fused.double(), tuple(a.double() for a in args)
    fused.load_state_dict(ref.state_dict())  # torch's SN layout converts on load
    assert next(fused.parameters()).dtype == torch.float64
    a, b = ref(*args), fused(*args)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-11 * (a.abs().max().item() + 1))
    a.square().sum().backward()
    b.square().sum().backward()
    grads_ref = {n.replace(".parametrizations.weight.original", ".weight_orig"): p.grad
                 for n, p in ref.named_parameters()}
    # sums in another order; a conv bias feeding a batch norm has an exactly-zero gradient in
    # exact arithmetic, so errors are measured against the model's gradient scale
    scale = max(g.abs().max().item() for g in grads_ref.values())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-8, atol=1e-10 * scale, msg=n)


@pytest.mark.parametrize("layers_kind", ["fastinv", "torch"])
def test_models_in_channels_last_convolve_in_channels_last(layers_kind):
    """G and D moved to channels_last (``run.channels_last``) run every 3x3 / 1x1 convolution
    of their blocks in it, from NCHW inputs too (an augmentation's output): oneDNN copies
    NCHW activations in and out of each bf16 convolution, the copies this layout avoids."""
    torch.manual_seed(0)
    G = Generator(num_classes=5, resolution=32, ch=4, noise_dim=12, shared_dim=8,
                  attention_resolution=0, layers=layers_kind)
    D = Discriminator(5, resolution=32, ch=4, attention_resolution=0, layers=layers_kind)
    outs = []
    for net in (G, D):
        net.to(memory_format=torch.channels_last)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda m, a, y: outs.append((m, y)))
    z = torch.randn(4, 5)
    x = G(z, G.sample_noise(4))
    D(torch.randn(4, 3, 32, 32), z).sum().backward()
    assert len(outs) > 10
    for m, y in outs:
        if y.shape[1] > 1 and y.shape[2] > 1:  # a (N, 1, H, W) or 1x1 map is both layouts
            assert y.is_contiguous(memory_format=torch.channels_last), (m, y.stride())
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_model_configs_are_types_that_round_trip_through_a_checkpoint_dict():
    import dataclasses

    from fastinv.models.discriminator import DiscriminatorConfig
    from fastinv.models.generator import GeneratorConfig

    g = GeneratorConfig(5, resolution=16, ch=4, noise_dim=12, shared_dim=8, attention_resolution=0)
    torch.manual_seed(0)
    a = Generator(g)
    torch.manual_seed(0)
    b = Generator(5, resolution=16, ch=4, noise_dim=12, shared_dim=8, attention_resolution=0)
    assert a.config == b.config == g
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    stored = dataclasses.asdict(g)
    assert GeneratorConfig.from_dict(stored) == g
    older = {k: v for k, v in stored.items() if k != "cond_input"}  # before that option
    assert GeneratorConfig.from_dict(older).cond_input is False
    with pytest.raises(ValueError, match="unknown fields"):
        GeneratorConfig.from_dict({**stored, "no_such_field": 1})
    with pytest.raises(TypeError, match="not both"):
        Generator(g, ch=8)
    d = DiscriminatorConfig(5, resolution=32, ch=4, phi_channels=[8, 16], phi_resolution=[16, 8])
    assert Discriminator(d).config == DiscriminatorConfig.from_dict(dataclasses.asdict(d))


def test_layer_factories_are_passed_down_and_unknown_ones_refused():
    import fastinv.nn as fnn

    fused = layers.for_implementation("fastinv")
    plain = layers.for_implementation("torch")
    assert isinstance(fused.sn_conv2d(3, 4, 3, 1, 1e-6), fnn.SNConv2d)
    conv = plain.sn_conv2d(3, 4, 3, 1, 1e-6)
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
    G = _g(layers="torch")  # every block of a torch-layer model got torch's layers
    assert not any(fnn.is_spectral_norm(m) for m in G.modules())
    assert not any(isinstance(m, fnn.ConditionalBatchNorm2d) for m in G.modules())
    with pytest.raises(ValueError, match="layer implementation must be one of"):
        _g(layers="cudnn")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_downsample2_is_avg_pool_with_its_gradient(dtype, memory_format):
    """The CPU pairwise-sum path (NCHW) and the avg_pool2d path (channels_last) both equal
    F.avg_pool2d, values and input gradients, in every dtype."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 8, 6, generator=g, dtype=torch.float64)
    x = x0.to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    ref_x = x0.to(dtype).requires_grad_()
    y, ref = layers.downsample2(x), torch.nn.functional.avg_pool2d(ref_x, 2)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(grad)
    ref.backward(grad)
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == torch.float64 else (
        dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2))
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(layers.downsample2, (x0.clone().requires_grad_(),))


def test_downsample2_odd_sizes_are_avg_pool2ds():
    odd = torch.randn(2, 3, 5, 7)  # avg_pool2d itself (it floors)
    torch.testing.assert_close(layers.downsample2(odd), torch.nn.functional.avg_pool2d(odd, 2))


def test_blocks_compute_biggans_formulas():
    """GBlock's shortcut up(conv_sc(x)) and DBlock's pool(h + conv_sc(x)) are BigGAN's
    conv_sc(up(x)) and pool(h) + pool(conv_sc(x)), in float64."""
    import torch.nn.functional as F

    from fastinv.models.discriminator import DBlock
    from fastinv.models.generator import GBlock

    torch.manual_seed(0)
    make = layers.for_implementation("fastinv")
    gb = GBlock(6, 4, cond_dim=5, bn_eps=1e-5, sn_eps=1e-6, make=make).double()
    x, cond = torch.randn(3, 6, 4, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    gb(x, cond)  # one training forward: running statistics and (u, v) move; then fixed
    gb.eval()
    h = gb.conv2(gb.bn2(gb.conv1(layers.upsample2(gb.bn1(x, cond))), cond))
    expect = h + gb.conv_sc(F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(gb(x, cond), expect, rtol=1e-12, atol=1e-12)

    db = DBlock(4, 6, downsample=True, preactivation=True, sn_eps=1e-6, make=make).double()
    db.eval()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    h = db.conv2(torch.relu(db.conv1(torch.relu(x))))
    expect = F.avg_pool2d(h, 2) + F.avg_pool2d(db.conv_sc(x), 2)
    torch.testing.assert_close(db(x), expect, rtol=1e-12, atol=1e-12)
