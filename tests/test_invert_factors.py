"""The factor regressor reads the nuisance factors off real synthetic images."""

import numpy as np
import pytest
import torch

from fastinv.data.synth import draw_factors, render
from fastinv.invert.factors import (
    factor_retention,
    factor_targets,
    r2_per_factor,
    train_factor_regressor,
)
from tests.invert_tiny import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _synthetic(n, seed, res=32):
    f = draw_factors(n, seed=seed, num_classes=4)
    imgs = np.stack([render({k: v[i] for k, v in f.items()}, res)[0] for i in range(n)])
    return torch.tensor(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, f


@pytest.fixture(scope="module", params=["none", "bf16"])
def fitted(request):
    """Trained in float32 and under bf16 autocast (the demo's "auto" on a CPU with AMX /
    AVX512-BF16; emulated, slower, elsewhere): both read the factors."""
    x_train, f_train = _synthetic(900, seed=0)
    x_test, f_test = _synthetic(200, seed=1)
    y_train, names = factor_targets(f_train)
    y_test, _ = factor_targets(f_test)
    model = train_factor_regressor(x_train, y_train, epochs=8, width=16, amp=request.param)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model, names, x_test, y_test


def test_regressor_recovers_colours_texture_and_position(fitted):
    model, names, x_test, y_test = fitted
    r2 = r2_per_factor(model.predict(x_test), y_test, names)
    assert set(r2) == {"fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b", "texture", "x", "y",
                       "scale", "rotation"}
    for f in ("bg_r", "bg_g", "bg_b", "texture"):
        assert r2[f] > 0.8, (f, r2)
    for f in ("x", "y", "fg_r", "fg_g", "fg_b"):
        assert r2[f] > 0.3, (f, r2)


def test_reconstructions_without_information_score_no_better_than_chance(fitted):
    model, names, x_test, y_test = fitted
    grey = torch.zeros_like(x_test)  # an "inverter" that keeps nothing
    shuffled = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))]
    out = factor_retention(model, y_test, names, x_test, {"grey": grey, "shuffled": shuffled})
    assert out["real"]["bg_r"] > 0.8
    for method in ("grey", "shuffled"):
        assert out[method]["bg_r"] < 0.1 and out[method]["x"] < 0.1


def test_rotation_becomes_cos_and_sin_and_missing_factors_are_named():
    y, names = factor_targets({"rotation": [0.0, 90.0]}, factors=("rotation",))
    assert names == ["rotation_cos", "rotation_sin"]
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6, rtol=0)
    with pytest.raises(KeyError, match="'scale' is not in the factor table"):
        factor_targets({"x": [0.1]}, factors=("scale",))


def test_a_bad_amp_is_refused_before_training():
    x, y = torch.zeros(4, 3, 8, 8), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="amp must be one of"):
        train_factor_regressor(x, y, epochs=1, amp="fp8")


def _probe_data(n, seed, classes=5):
    """Logits of ``classes`` classes and two factors: "size" moves a different logit direction
    in each class (as the synthetic shapes' size does, RESULTS.md Demo round 29), "noise" is
    not in the logits at all."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n,), generator=g)
    size = torch.rand(n, generator=g)
    direction = torch.randn(classes, classes, generator=torch.Generator().manual_seed(99))
    logits = 6 * torch.nn.functional.one_hot(label, classes).float()
    logits = logits + size[:, None] * direction[label] + 0.05 * torch.randn(n, classes, generator=g)
    noise = torch.rand(n, generator=g)
    return logits, torch.stack([size, noise], 1)


def test_logit_probe_reads_a_factor_each_class_codes_in_its_own_logit_direction():
    from fastinv.invert.factors import logit_probe

    train_z, train_y = _probe_data(4000, 0)
    z, y = _probe_data(600, 1)
    r2, intervals = logit_probe(train_z, train_y, z, y, ["size", "noise"], n_boot=200)
    assert r2["size"] > 0.9 and intervals["size"]["lo"] > 0.9
    assert r2["noise"] < 0.02 and intervals["noise"]["lo"] < 0 < intervals["noise"]["hi"]
    # one linear map of the logits for all classes reads the size far worse: the probe's
    # per-class blocks are what find it
    x = torch.cat([train_z, torch.ones(len(train_z), 1)], 1).double()
    w = torch.linalg.lstsq(x, train_y.double()).solution
    pred = torch.cat([z, torch.ones(len(z), 1)], 1).double() @ w
    shared = 1 - ((pred[:, 0] - y[:, 0]) ** 2).sum() / ((y[:, 0] - y[:, 0].mean()) ** 2).sum()
    assert shared < r2["size"] - 0.3


def test_logit_probe_refuses_mismatched_rows_and_survives_an_empty_class():
    from fastinv.invert.factors import logit_probe

    z, y = _probe_data(300, 0)
    with pytest.raises(ValueError, match="same rows"):
        logit_probe(z, y[:-1], z, y, ["size", "noise"])
    keep = z.argmax(1) != 0  # no training image of class 0: its block is all zeros
    r2, _ = logit_probe(z[keep], y[keep], z, y, ["size", "noise"], n_boot=20)
    assert np.isfinite(r2["size"])


def test_within_class_r_reads_what_follows_x_beyond_the_class():
    from fastinv.invert.factors import within_class_r

    g = torch.Generator().manual_seed(0)
    n = 400
    classes = torch.randint(0, 4, (n,), generator=g)
    size = torch.rand(n, generator=g) + classes  # the class mean differs: 0.5, 1.5, ...
    targets = torch.stack([size, torch.rand(n, generator=g)], 1)
    names = ["scale", "x"]
    # x̂ draws the size for 40% of the images (another of its class's sizes for the rest: its
    # R² within the class is 1 - 2 x 0.6 < 0) and x at random
    drawn = torch.rand(n, generator=g) < 0.4
    weak = torch.stack([torch.where(drawn, size, classes + torch.rand(n, generator=g)),
                        torch.rand(n, generator=g)], 1)
    out = within_class_r(weak, targets, classes, names, n_boot=200)
    assert 0.2 < out["scale"]["lo"] < 0.4 < out["scale"]["hi"] and out["x"]["lo"] < 0 < out["x"]["hi"]
    assert out["scale"]["level"] == pytest.approx(1 - 0.05 / 2)  # Bonferroni over 2 factors
    # an x̂ that only draws the class (each class's mean size) carries nothing beyond it
    class_only = torch.stack([classes.float() + 0.5 + torch.randn(n, generator=g) * 0.3,
                              torch.rand(n, generator=g)], 1)
    out = within_class_r(class_only, targets, classes, names, n_boot=200)
    assert out["scale"]["lo"] < 0 < out["scale"]["hi"]
    with pytest.raises(ValueError, match="same rows"):
        within_class_r(weak[:-1], targets, classes, names)


def test_the_factor_figure_shows_the_factor_the_logit_nn_follows_sorted_within_classes(tmp_path):
    """carried_factor picks the reference's best finite r among the single columns; the
    strips hold each class's images from smallest to largest; the figure is written."""
    from PIL import Image

    from fastinv.invert.factors import (
        carried_factor,
        centred_within,
        save_factor_figure,
        sorted_within_classes,
        within_class_r,
    )

    iv = lambda m: {"mean": m, "lo": m - 0.1, "hi": m + 0.1}  # noqa: E731
    table = {"inverter": {"scale": iv(0.9)},
             "logit NN": {"scale": iv(0.5), "x": {"mean": 0.6, "lo": 0.0, "hi": 1.2},
                          "rotation": iv(0.8), "y": iv(np.nan)}}
    assert carried_factor(table, among=["scale", "x", "y"]) == "scale"  # surest, not largest
    assert carried_factor(table) == "rotation"
    assert carried_factor({"inverter": {"scale": iv(0.9)}}) is None

    t = np.array([5.0, 1.0, 3.0, 2.0, 9.0, 4.0, 7.0])
    classes = np.array([0, 0, 0, 1, 1, 1, 2])  # class 2 has one image: left out
    rows = sorted_within_classes(t, classes, n_classes=3, per_class=8)
    assert [c for c, _ in rows] == [0, 1]
    assert [list(t[idx]) for _, idx in rows] == [[1.0, 3.0, 5.0], [2.0, 4.0, 9.0]]
    assert [len(idx) for _, idx in sorted_within_classes(t, classes, per_class=2)] == [2, 2]
    np.testing.assert_allclose(centred_within(t, classes)[:3], [2.0, -2.0, 0.0])
    # any labels (gaps, strings), the same values as centring one class at a time
    v = np.random.default_rng(0).normal(size=50)
    for labels in (np.random.default_rng(1).integers(0, 4, 50) * 7 + 3,
                   np.array(["a", "b", "c"])[np.random.default_rng(2).integers(0, 3, 50)]):
        loop = v.copy()
        for c in np.unique(labels):
            loop[labels == c] -= v[labels == c].mean()
        np.testing.assert_allclose(centred_within(v, labels), loop, atol=1e-12)

    g = torch.Generator().manual_seed(0)
    n = 60
    cls = torch.arange(n) % 3
    targets = torch.stack([torch.rand(n, generator=g), torch.rand(n, generator=g)], 1)
    preds = {"inverter": targets + 0.1 * torch.randn(n, 2, generator=g),
             "logit NN": targets.clone()}
    names = ["scale", "x"]
    within = {m: within_class_r(p, targets, cls, names, n_boot=20) for m, p in preds.items()}
    images = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    path = save_factor_figure(tmp_path / "factors.png", carried_factor(within), names, images,
                              {"inverter": images.flip(0), "logit NN": images}, targets, preds,
                              cls, within, ["a", "b", "c"])
    assert Image.open(path).size[0] > 300
