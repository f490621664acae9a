"""Training config: presets, YAML, --key=value overrides, clear errors."""

from __future__ import annotations

import pytest

from fastinv.train import cli
from fastinv.train.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    from_dict,
    load_config,
    save_yaml,
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_and_validate(preset):
    over = [] if preset == "tiny" else ["--classifier.weights=clf.safetensors"]
    cfg = load_config(preset, over)
    assert isinstance(cfg, TrainConfig)


def test_imagenet_preset_has_biggan_128_sizes():
    cfg = load_config("imagenet-128", ["--weights=r50.pth"])
    assert (cfg.data.resolution, cfg.data.batch_size, cfg.model.g_ch, cfg.model.d_ch) == (128, 256, 96, 96)
    assert cfg.model.attention_resolution == 64 and cfg.optim.d_steps == 2
    assert (cfg.optim.beta1, cfg.optim.beta2) == (0.0, 0.999)


def test_overrides_dotted_and_unique_keys():
    cfg = load_config("tiny", ["--model.g_ch=7", "--steps=9", "--amp=bf16", "--root=none",
                               "--channels_last=true", "--g_lr=3e-4"])
    assert (cfg.model.g_ch, cfg.run.steps, cfg.run.amp) == (7, 9, "bf16")
    assert cfg.data.root is None and cfg.run.channels_last is True and cfg.optim.g_lr == 3e-4


def test_yaml_roundtrip_and_override_on_top(tmp_path):
    cfg = load_config("tiny", ["--steps=11"])
    save_yaml(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml", ["--d_steps=3"])
    assert again.run.steps == 11 and again.optim.d_steps == 3
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,message", [
    ("--stepz=3", "unknown config key 'stepz'"),
    ("--model.nope=3", "unknown key model.nope"),
    ("--steps=abc", "run.steps must be an integer"),
    ("--steps=0", "run.steps must be >= 1"),
    ("--resolution=48", "data.resolution must be one of"),
    ("--channels_last=maybe", "must be true or false"),
    ("--amp=fp8", "run.amp must be one of"),
    ("--logit_preprocess=softmax", "logit_preprocess must be one of"),
    ("--attention_resolution=32", "attention_resolution"),
    ("--ema_decay=1.5", "ema_decay must be in"),
    ("steps", "must look like --key=value"),
])
def test_config_errors_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_missing_classifier_weights_name_the_key():
    with pytest.raises(ConfigError, match="--classifier.weights=PATH"):
        load_config("demo-cpu")


def test_unknown_preset_or_file(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("imagenet-512")
    (tmp_path / "bad.yaml").write_text("run: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "sec.yaml").write_text("runn:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'runn'"):
        load_config(tmp_path / "sec.yaml")


def test_cli_prints_config_and_reports_errors(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    cli.register(parser)
    assert cli.run(parser.parse_args(["tiny", "--steps=5", "--print-config"])) == 0
    assert "steps: 5" in capsys.readouterr().out
    assert cli.run(parser.parse_args(["tiny", "--stepz=5"])) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_validate_checks_once_per_content_and_again_after_a_change(monkeypatch):
    from fastinv.train import config as config_mod

    cfg = load_config("tiny")  # validated here
    calls = []
    real = config_mod._check
    monkeypatch.setattr(config_mod, "_check", lambda c: (calls.append(1), real(c)))
    config_mod.validate(cfg)
    config_mod.validate(cfg)
    assert calls == []  # unchanged since load_config: no second pass over the fields
    cfg.data.batch_size = 0  # changed after validation: checked again, and refused
    with pytest.raises(ConfigError, match="batch_size"):
        config_mod.validate(cfg)
    assert calls == [1]


def test_cross_replica_bn_with_torch_layers_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="cross_replica_bn.*layers=fastinv"):
        load_config("tiny", ["--cross_replica_bn=true", "--layers=torch"])
    assert load_config("tiny", ["--cross_replica_bn=true"]).model.cross_replica_bn
