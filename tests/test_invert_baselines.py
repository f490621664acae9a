"""Optimization-based inversion reduces the logit distance it minimises."""

import pytest
import torch

from fastinv.invert.baselines import OptimizationConfig, optimize_inversion, total_variation
from fastinv.invert.metrics import classifier_logits
from tests.invert_tiny import one_thread, tiny_pair

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_optimization_reduces_logit_distance():
    _, C = tiny_pair(seed=0)
    torch.manual_seed(2)
    target = classifier_logits(C, torch.rand(5, 3, 16, 16) * 2 - 1).detach()
    cfg = OptimizationConfig(steps=40, lr=0.1, restarts=2, tv_weight=0.0, l2_weight=0.0, batch_size=3)
    res = optimize_inversion(C, target, resolution=16, cfg=cfg)
    assert res.images.shape == (5, 3, 16, 16)
    assert res.images.min() >= -1 and res.images.max() <= 1
    assert (res.logit_distance < res.initial_distance).all()
    assert res.history[-1] < 0.5 * res.history[0]
    assert res.seconds > 0
    # the classifier is left as it was found
    assert all(not p.requires_grad for p in C.parameters())


def test_kept_restart_is_the_best_of_the_random_starts_when_not_optimised():
    _, C = tiny_pair(seed=0)
    target = torch.randn(3, 4)
    res = optimize_inversion(C, target, 16, OptimizationConfig(steps=0, restarts=4))
    torch.testing.assert_close(res.logit_distance, res.initial_distance)
    single = optimize_inversion(C, target, 16, OptimizationConfig(steps=0, restarts=1, seed=5))
    assert res.logit_distance.mean() <= single.logit_distance.mean() + 0.5


def test_total_variation_is_zero_for_constant_images_and_positive_otherwise():
    assert total_variation(torch.ones(2, 3, 8, 8)).abs().max() == 0
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    x = checker.float().expand(1, 3, 8, 8)
    assert total_variation(x).item() == pytest.approx(2.0)


def test_bad_config_is_rejected():
    _, C = tiny_pair()
    with pytest.raises(ValueError, match="restarts >= 1"):
        optimize_inversion(C, torch.randn(2, 4), 16, OptimizationConfig(restarts=0))
