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
