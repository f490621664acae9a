"""Metrics on cases whose answer is known."""

import json
import math

import pytest
import torch

from fastinv.invert import metrics
from tests.invert_tiny import TinyClassifier, one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = _images()
    m = metrics.pixel_fidelity(x, x.clone())
    assert math.isinf(m["psnr"]) and m["psnr"] > 0
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_psnr_of_a_constant_offset_matches_the_formula():
    x = _images() * 0.5  # stays inside [-1, 1] after the offset
    delta = 0.2  # in [-1, 1] units = 0.1 in [0, 1] units -> MSE 0.01 -> PSNR 20 dB
    m = metrics.pixel_fidelity(x + delta, x)
    assert m["psnr"] == pytest.approx(20.0, abs=1e-3)


def test_shifted_image_has_psnr_from_its_mse_and_ssim_below_one():
    x = _images(n=2, size=32)
    shifted = torch.roll(x, shifts=3, dims=-1)
    mse = (((shifted + 1) / 2 - (x + 1) / 2) ** 2).mean(dim=(1, 2, 3))
    expected = (10 * torch.log10(1 / mse)).mean().item()
    m = metrics.pixel_fidelity(shifted, x)
    assert m["psnr"] == pytest.approx(expected, rel=1e-4)
    assert m["ssim"] < 0.5  # uniform noise shifted by 3 px is nearly uncorrelated


@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (3, 1, 24, 40), (2, 2, 7, 9)], ids=str)
def test_psnr_equals_torchmetrics(shape):
    # fastinv's PSNR is torchmetrics' (data range 1, per image, then the mean), computed here
    from torchmetrics.functional.image import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    for y in (torch.rand(shape, generator=g, dtype=torch.float64),
              (x + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)):
        expected = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none",
                                           dim=tuple(range(1, len(shape))))
        m = metrics.pixel_fidelity(y * 2 - 1, x * 2 - 1)  # the metrics take images in [-1, 1]
        assert m["psnr"] == pytest.approx(expected.mean().item(), rel=1e-6)
        torch.testing.assert_close(metrics.psnr_per_image(y * 2 - 1, x * 2 - 1).double(),
                                   expected, rtol=1e-6, atol=1e-5)


def test_training_and_the_demo_do_not_import_torchmetrics():
    # torchmetrics (with torchvision and scipy) takes ~3 s to import: every spawned demo worker
    # and every CLI call would pay it; only LPIPS / FID need it
    import subprocess
    import sys

    code = ("import sys, fastinv.cli, fastinv.demo, fastinv.train.gan, fastinv.invert.evaluate, "
            "fastinv.invert.deepsim_train; print('torchmetrics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("shape", [(6, 3, 32, 32), (3, 1, 24, 40), (2, 3, 16, 16), (2, 2, 7, 9)],
                         ids=str)
def test_ssim_equals_torchmetrics(shape):
    # fastinv's SSIM is torchmetrics' definition computed as matrix products: the same number
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    for y in (torch.rand(shape, generator=g, dtype=torch.float64),  # unrelated
              (x + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1),
              x.flip(-1), x * 0.5 + 0.25):
        expected = structural_similarity_index_measure(y, x, data_range=1.0)
        got = metrics.ssim(y, x, data_range=1.0)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        # float32 inputs: within float32 rounding of the float64 value
        torch.testing.assert_close(metrics.ssim(y.float(), x.float()).double(), expected,
                                   rtol=1e-5, atol=1e-6)
    assert metrics.ssim(x, x.clone()).item() == pytest.approx(1.0, abs=1e-12)


def test_ssim_refuses_images_smaller_than_its_window_and_mismatched_shapes():
    with pytest.raises(ValueError, match="more than 5 pixels"):
        metrics.ssim(torch.rand(1, 3, 5, 16), torch.rand(1, 3, 5, 16))
    with pytest.raises(ValueError, match="of one shape"):
        metrics.ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 8))


def test_identical_logits_agree_fully():
    logits = torch.randn(10, 7)
    labels = logits.argmax(1)
    a = metrics.classifier_agreement(logits, logits, labels)
    assert a["top1_vs_orig"] == 1.0 and a["top5_vs_orig"] == 1.0 and a["top1_vs_label"] == 1.0
    c = metrics.logit_consistency(logits, logits)
    assert c["logit_cosine"] == pytest.approx(1.0) and c["logit_rel_l2"] == pytest.approx(0.0)


def test_agreement_counts_top1_and_top5_hits():
    orig = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6]])
    rec = torch.tensor([[4.0, 5, 3, 2, 1, 0, -1], [6, 5, 4, 3, 2, 1, 0]])
    a = metrics.classifier_agreement(rec, orig)
    assert a["top1_vs_orig"] == 0.0  # row 1 swaps the top two, row 2 reverses the order
    assert a["top5_vs_orig"] == 0.5  # row 1 keeps class 0 in its top 5, row 2 puts class 6 last


def test_negated_logits_have_cosine_minus_one_and_rel_l2_two():
    z = torch.randn(3, 5)
    c = metrics.logit_consistency(-z, z)
    assert c["logit_cosine"] == pytest.approx(-1.0) and c["logit_rel_l2"] == pytest.approx(2.0)


def test_noise_std_is_zero_for_identical_draws_and_known_for_two_values():
    x = _images(n=2)
    same = torch.stack([x, x, x], dim=1)
    assert metrics.noise_std(same).abs().max() == 0
    two = torch.stack([torch.full_like(x, -1), torch.full_like(x, 1)], dim=1)
    # [0, 1] units: values 0 and 1, unbiased std = sqrt(0.5)
    assert torch.allclose(metrics.noise_std(two), torch.full((2, 16, 16), math.sqrt(0.5)))
    with pytest.raises(ValueError, match="K >= 2"):
        metrics.noise_std(x[:, None])


def test_reconstruction_metrics_of_identity_are_perfect():
    torch.manual_seed(0)
    C = TinyClassifier().eval()
    x = _images()
    m = metrics.reconstruction_metrics(C, x, x.clone(), labels=torch.zeros(4, dtype=torch.long))
    assert m["top1_vs_orig"] == 1.0 and m["logit_cosine"] == pytest.approx(1.0)
    assert math.isinf(m["psnr"]) and m["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_classifier_input_resizes_and_normalises():
    C = TinyClassifier(input_size=8)
    x = torch.zeros(1, 3, 16, 16)  # grey 0.5 -> (0.5 - 0.5) / 0.25 = 0
    y = metrics.to_classifier_input(x, C)
    assert y.shape == (1, 3, 8, 8) and y.abs().max() == 0


def test_perceptual_metrics_are_reported_not_computed_without_weights():
    x = _images()
    m = metrics.optional_perceptual_metrics(x, x)
    assert m["lpips"].startswith("not computed") and m["fid"].startswith("not computed")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        metrics.lpips(x, x, "/nonexistent/alexnet.pth")


def test_json_safe_keeps_metrics_json_valid():
    text = json.dumps(metrics.json_safe({"psnr": float("inf"), "v": [1.0, float("nan")]}))
    assert json.loads(text) == {"psnr": "inf", "v": [1.0, "nan"]}


def test_pixel_fidelity_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.pixel_fidelity(_images(size=16), _images(size=8))


def test_lpips_reads_a_local_alexnet_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "alexnet.pth"  # a torchvision alexnet state dict; LPIPS reads features.*
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    x, y = _images(n=2, size=32, seed=0), _images(n=2, size=32, seed=1)
    assert metrics.lpips(x, x, path) == pytest.approx(0.0, abs=1e-6)
    assert metrics.lpips(x, y, path) > 0


def test_fid_reads_a_local_inception_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), path)
    x, y = _images(n=6, size=32, seed=0), _images(n=6, size=32, seed=1) * 0.2
    same, different = metrics.fid(x, x, path), metrics.fid(x, y, path)
    assert isinstance(same, float) and different > 0
    assert abs(same) < 0.05 * different
