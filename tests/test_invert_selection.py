"""Φ-consistent sampling (fastinv/invert/selection.py): best of k noise draws by Φ's KL."""

import pytest
import torch
from torch import nn

from fastinv.invert import analyses
from fastinv.invert.metrics import classifier_logits
from fastinv.invert.selection import PhiSelected, inverter_methods, phi_kl, selected_name
from tests.invert_tiny import one_thread, tiny_pair

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


class _ColourG(nn.Module):
    """A flat image whose red channel is the sign of the first noise value: half the draws are
    red (+1), half blue (-1), whatever the logits."""

    noise_dim, resolution = 3, 8

    def sample_noise(self, batch, generator=None):
        return torch.randn(batch, self.noise_dim, generator=generator)

    def forward(self, logits, noise):
        red = torch.sign(noise[:, 0]).view(-1, 1, 1, 1)
        img = torch.cat([red, torch.zeros_like(red), -red], dim=1)
        return img.expand(-1, 3, self.resolution, self.resolution).contiguous()


class _RedBlueClassifier(nn.Module):
    """Class 0 = red, class 1 = blue, read off the mean colour (a confident Φ)."""

    input_size, num_classes = 8, 2
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def forward(self, x):
        d = (x[:, 0] - x[:, 2]).mean(dim=(1, 2))
        return torch.stack([4 * d, -4 * d], dim=1)


def test_phi_kl_is_zero_for_agreeing_logits_and_grows_with_disagreement():
    z = torch.randn(6, 5)
    assert torch.allclose(phi_kl(z, z), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(phi_kl(z, z + 3.0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    other = z.roll(1, dims=1) * 3
    assert (phi_kl(z, other) > 0).all()
    assert (phi_kl(z, other * 2) > phi_kl(z, z * 1.01)).all()


def test_best_of_k_keeps_the_draws_that_phi_reads_as_the_logits():
    G, C = _ColourG(), _RedBlueClassifier()
    z = torch.tensor([[4.0, -4.0], [-4.0, 4.0]]).repeat(20, 1)  # red, blue, red, ...
    single = analyses.invert(G, z, seed=0)
    picked = analyses.invert(PhiSelected(G, C, k=8), z, seed=0)
    want = z.argmax(1)

    def hit(imgs):
        return (classifier_logits(C, imgs).argmax(1) == want).float().mean().item()

    # a single draw is right about half the time; with 8 draws, missing both colours has
    # probability 2^-7 per image
    assert 0.2 < hit(single) < 0.8
    assert hit(picked) == 1.0


def test_the_kept_draw_is_the_argmin_of_phi_kl_among_the_draws():
    G, C = tiny_pair(seed=3)
    sel = PhiSelected(G, C, k=5)
    z = torch.randn(7, 4) * 3
    noise = sel.sample_noise(7, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (7, 5, G.noise_dim)
    out = sel(z, noise)
    for i in range(7):
        draws = G(z[i : i + 1].expand(5, -1), noise[i])
        kl = phi_kl(z[i : i + 1].expand(5, -1), classifier_logits(C, draws))
        assert torch.equal(out[i], draws[kl.argmin()])


def test_best_of_one_is_the_single_draw():
    G, C = tiny_pair(seed=0)
    z = torch.randn(4, 4)
    noise = PhiSelected(G, C, k=1).sample_noise(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(PhiSelected(G, C, k=1)(z, noise), G(z, noise[:, 0]))


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_bad_k_is_refused(k):
    G, C = tiny_pair()
    with pytest.raises(ValueError, match="k"):
        PhiSelected(G, C, k=k)


def test_noise_of_the_wrong_shape_is_refused():
    G, C = tiny_pair()
    with pytest.raises(ValueError, match=r"\(N, k, noise_dim\)"):
        PhiSelected(G, C, k=3)(torch.randn(2, 4), torch.randn(2, G.noise_dim))


def test_method_name_names_k():
    assert selected_name(16) == "inverter, best of 16"


def test_chunked_selection_keeps_the_same_draws():
    G, C = tiny_pair(seed=5)
    sel = PhiSelected(G, C, k=4)
    z = torch.randn(37, 4) * 3
    noise = sel.sample_noise(37, generator=torch.Generator().manual_seed(2))
    whole = sel(z, noise)
    sel.CHUNK = 8  # 2 images' draws a call, the last call a single image's
    assert torch.allclose(sel(z, noise), whole, atol=1e-6)


def test_inverter_methods_adds_the_best_of_row_only_for_k_above_one():
    G, C = tiny_pair()
    assert list(inverter_methods(G, C, 1)) == ["inverter"]
    rows = inverter_methods(G, C, 4)
    assert list(rows) == ["inverter", "inverter, best of 4"] and rows["inverter"] is G
    assert rows["inverter, best of 4"].k == 4
