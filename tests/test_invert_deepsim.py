"""The DeePSiM-style decoder baseline trains, saves, loads and plugs into the analyses."""

import pytest
import torch

from fastinv.invert import analyses
from fastinv.invert.deepsim_train import (
    ComparatorFeatures,
    DeepSimConfig,
    load_deepsim,
    train_deepsim,
)
from fastinv.invert.metrics import classifier_logits
from fastinv.models.classifiers import load_classifier
from fastinv.models.deepsim import DeepSimDecoder
from tests.invert_tiny import one_thread, tiny_pair

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return load_classifier("fastinv:small_resnet", random_init=True, num_classes=4)


def test_comparator_uses_the_features_before_the_linear_head(classifier):
    comp = ComparatorFeatures(classifier)
    feats, logits = comp(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert logits.shape == (2, 4) and feats.dim() == 4  # SmallResNet's last stage map
    comp.close()
    assert not classifier.net.stages._forward_hooks


def test_decoder_shapes_and_rejects_odd_resolutions():
    G = DeepSimDecoder(num_classes=5, resolution=16, width=8)
    x = G(torch.randn(3, 5), G.sample_noise(3))
    assert x.shape == (3, 3, 16, 16) and x.abs().max() <= 1
    with pytest.raises(ValueError, match="power-of-two"):
        DeepSimDecoder(5, resolution=24)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_training_lowers_pixel_error_and_round_trips(tmp_path, amp):
    _, classifier = tiny_pair(seed=0, resolution=16)
    torch.manual_seed(1)
    images = torch.rand(32, 3, 16, 16) * 2 - 1
    images = torch.nn.functional.avg_pool2d(images, 8).repeat_interleave(8, -1).repeat_interleave(8, -2)
    with torch.no_grad():
        logits = classifier_logits(classifier, images)
    torch.manual_seed(0)  # train_deepsim seeds 0 too: the same initial decoder
    untrained = DeepSimDecoder(4, 16, 8)
    before = torch.nn.functional.mse_loss(untrained(logits), images).item()
    cfg = DeepSimConfig(steps=40, batch_size=16, width=8, lr=1e-3, log_every=20, amp=amp)
    G, path = train_deepsim(classifier, images, logits, tmp_path, cfg, progress=False)
    assert all(p.dtype == torch.float32 for p in G.parameters())  # autocast keeps fp32 weights
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(G(logits), images).item()
    assert after < before
    assert (tmp_path / "deepsim.json").is_file() and any((tmp_path / "tb").iterdir())
    G2 = load_deepsim(path)
    torch.testing.assert_close(G2(logits), G(logits))
    # deterministic decoder: the analyses accept it, and resampling changes nothing
    data = analyses.Images.from_images(classifier, images[:6], torch.zeros(6, dtype=torch.long))
    m = analyses.resample(G2, classifier, data, tmp_path / "resample", k=2, n_show=2)
    assert m["noise_std"] == 0


def test_decoder_standardises_its_logits_and_keeps_the_statistics():
    """Raw logits of a confident classifier (norm ~30) reach the FC stack in training-set
    units; the statistics are buffers, so a saved decoder standardises the same way."""
    torch.manual_seed(0)
    logits = torch.randn(256, 5) * torch.tensor([30.0, 5.0, 1.0, 0.1, 12.0]) + 7.0
    G = DeepSimDecoder(5, 16, 8)
    before = G(logits[:4])
    G.set_statistics(logits)
    torch.testing.assert_close(G.logit_shift, logits.mean(0))
    torch.testing.assert_close(G.logit_scale, logits.std(0))
    assert not torch.allclose(G(logits[:4]), before)
    # a decoder loaded from the state dict standardises the same way
    G2 = DeepSimDecoder(5, 16, 8)
    G2.load_state_dict(G.state_dict())
    torch.testing.assert_close(G2(logits[:4]), G(logits[:4]))
    assert {"logit_shift", "logit_scale"} <= set(G.state_dict())


def test_a_bad_amp_is_refused_before_training(tmp_path):
    _, classifier = tiny_pair(seed=0, resolution=16)
    with pytest.raises(ValueError, match="amp must be one of"):
        train_deepsim(classifier, torch.zeros(4, 3, 16, 16), torch.zeros(4, 4), tmp_path,
                      DeepSimConfig(steps=1, amp="fp8"), progress=False)
    assert not (tmp_path / "deepsim.safetensors").exists()
