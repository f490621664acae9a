"""Mixed precision (run.amp / ClassifierConfig.amp): which autocast a run gets, and bf16 training
runs end to end on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from fastinv.train import precision
from fastinv.train.classifier import ClassifierConfig
from fastinv.train.config import ConfigError, load_config
from fastinv.train.gan import train_inverter
from tests.train_tiny import tiny_dataset


def test_none_is_float32_and_bf16_is_bf16_on_every_device():
    assert precision.autocast_dtype("none", "cpu") is None
    assert precision.autocast_dtype("bf16", "cpu") is torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_native_bf16_support(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    assert precision.autocast_dtype("auto", "cpu") is (torch.bfloat16 if native else None)


def test_native_bf16_is_a_bool_for_this_cpu_and_false_for_other_devices():
    assert isinstance(precision.native_bf16("cpu"), bool)
    assert precision.native_bf16("meta") is False


def test_autocast_context_switches_the_matmul_dtype():
    a = torch.randn(4, 4)
    with precision.autocast("bf16", "cpu"):
        assert (a @ a).dtype is torch.bfloat16
    with precision.autocast("none", "cpu"):
        assert (a @ a).dtype is torch.float32


def test_unknown_amp_is_a_clear_error_everywhere():
    with pytest.raises(ValueError, match="amp must be one of"):
        precision.autocast_dtype("fp8", "cpu")
    with pytest.raises(ConfigError, match="run.amp must be one of"):
        load_config("tiny", ["--amp=fp16"])
    with pytest.raises(ValueError, match="amp must be one of"):
        ClassifierConfig(data="somewhere", amp="half").validate()


def test_a_bf16_inverter_run_trains_with_finite_losses(tmp_path, tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tiny_dataset(tmp_path_factory)
    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={data}", "--steps=4",
                               "--log_every=2", "--amp=bf16", "--d_head_weight=1"])
    run_dir = train_inverter(cfg)
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for tag in ("loss_d", "loss_g", "d_head"):
        values = [e.value for e in acc.Scalars(tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (tag, values)
