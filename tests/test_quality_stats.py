"""The evaluation that cannot be fooled: KID, bootstrap intervals, verdicts, the judge's
features and the logit-space nearest neighbour, on cases whose answer is known."""

import numpy as np
import pytest
import torch

from fastinv.invert.quality import NearestNeighbour, judge_features, nearest_neighbour, per_image
from fastinv.invert.stats import Gate, bootstrap_diff, bootstrap_mean, kid, verdict
from fastinv.models.classifiers import load_classifier


def test_kid_of_identical_sets_is_near_zero():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    mean, std = kid(x, x.clone(), subsets=20, subset_size=100)
    shifted, _ = kid(x, x + 1.0, subsets=20, subset_size=100)
    assert abs(mean) < 0.1 and abs(mean) < 0.02 * shifted and std >= 0


def test_kid_of_two_samples_of_one_distribution_is_near_zero():
    g = torch.Generator().manual_seed(1)
    mean, _ = kid(torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g))
    assert abs(mean) < 0.05


def test_kid_of_a_shifted_distribution_is_positive():
    g = torch.Generator().manual_seed(2)
    same, _ = kid(torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g))
    shifted, _ = kid(torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g) + 1.0)
    assert shifted > 0.5 and shifted > 20 * abs(same)


def test_kid_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="one width"):
        kid(torch.randn(10, 4), torch.randn(10, 5))


def test_constant_difference_gives_an_interval_excluding_zero():
    a = np.linspace(0, 1, 200)
    iv = bootstrap_diff(a + 0.3, a)
    assert iv.excludes_zero() and iv.lo > 0 and abs(iv.mean - 0.3) < 1e-9


def test_pure_noise_gives_an_interval_including_zero():
    rng = np.random.default_rng(0)
    iv = bootstrap_diff(rng.normal(size=300), rng.normal(size=300))
    assert iv.lo < 0 < iv.hi and not iv.excludes_zero()


def test_bootstrap_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_mean([1.0])


def test_verdict_reproduced_contradicted_inconclusive():
    up = bootstrap_mean(np.full(50, 0.5) + np.linspace(0, 0.1, 50))
    down = bootstrap_mean(-np.full(50, 0.5) - np.linspace(0, 0.1, 50))
    noise = bootstrap_mean(np.random.default_rng(0).normal(size=100))
    ok = [Gate("classifier val acc", 0.98, 0.9)]
    assert verdict(up, +1, ok).outcome == "reproduced"
    assert verdict(down, +1, ok).outcome == "contradicted"
    assert verdict(up, -1, ok).outcome == "contradicted"
    assert verdict(noise, +1, ok).outcome == "inconclusive"
    weak = verdict(up, +1, [Gate("judge agreement", 0.3, 0.5)])
    assert weak.outcome == "inconclusive" and "judge agreement" in weak.reason
    assert verdict(None, +1, ok).outcome == "inconclusive"
    # no interval because a gate failed (one misclassified image): the gate is the reason given
    few = verdict(None, +1, ok + [Gate("misclassified images", 1, 5)])
    assert few.outcome == "inconclusive" and "misclassified images 1 < 5" in few.reason


def test_gate_with_nan_does_not_hold():
    assert not Gate("x", float("nan"), 0.0).holds


def test_nearest_neighbour_returns_the_training_image_with_the_nearest_logits():
    train_logits = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    train_images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    query = torch.tensor([[9.0, 1.0], [0.5, 8.0], [0.1, -0.2]])
    out = nearest_neighbour(train_logits, train_images, query)
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 0.0]
    dec = NearestNeighbour(train_logits, train_images)
    assert torch.equal(dec(query, dec.sample_noise(3)), out)


def test_judge_features_and_per_image_measures():
    judge = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)
    clf = load_classifier("fastinv:small_resnet", random_init=True, num_classes=4)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    f = judge_features(judge, x)
    assert f.shape == (6, 4 * 16)
    with torch.no_grad():
        logits = clf(clf.prepare(x)).float()
    m = per_image(clf, judge, x, x, torch.zeros(6, dtype=torch.long), logits)
    assert m["phi_agree"].tolist() == [1.0] * 6  # x̂ = x: Φ agrees with itself
    assert m["judge_vs_judge"].tolist() == [1.0] * 6
    assert torch.all(m["psnr"] > 90)


def test_bootstrap_stat_of_an_r2_excludes_zero_only_when_there_is_signal():
    from fastinv.invert.stats import bootstrap_stat

    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    good = y + 0.3 * rng.normal(size=200)
    bad = rng.normal(size=200)

    def r2(pred):
        return lambda i: 1 - ((pred[i] - y[i]) ** 2).sum() / ((y[i] - y[i].mean()) ** 2).sum()

    assert bootstrap_stat(r2(good), 200).lo > 0.5
    assert not bootstrap_stat(r2(bad), 200).lo > 0


def test_optimization_subset_spreads_over_a_class_ordered_set():
    from fastinv.invert.evaluate import optimization_subset

    labels = torch.arange(10).repeat_interleave(50)  # 500 images in class order
    idx = optimization_subset(len(labels), 20)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert set(labels[idx].tolist()) == set(range(10))  # every class, not 20 of class 0
    assert optimization_subset(5, 32).tolist() == [0, 1, 2, 3, 4]
    assert optimization_subset(5, 0).numel() == 0
