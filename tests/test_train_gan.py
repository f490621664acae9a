"""The inverter trainer on CPU: a tiny run, checkpoints, bit-for-bit resume, signals, EMA."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from fastinv.train import checkpoint
from fastinv.train.config import load_config
from fastinv.train.distributed import DistInfo
from fastinv.train.gan import InverterTrainer, train_inverter
from tests.train_tiny import tiny_dataset


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _cfg(tmp_path, data, *overrides):
    return load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={data}", *overrides])


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_tiny_run_trains_logs_and_checkpoints(tmp_path, synthetic_data):
    cfg = _cfg(tmp_path, synthetic_data, "--steps=24", "--log_every=4", "--image_every=12",
               "--ckpt_every=10", "--keep_checkpoints=2")
    run_dir = train_inverter(cfg)
    for tag in ("loss_d", "loss_g", "d_real", "d_fake"):
        values = _scalars(run_dir, tag)
        assert len(values) == 6 and all(math.isfinite(v) for v in values), tag
        assert len(set(values)) > 1, f"{tag} never moved"
    assert _scalars(run_dir, "img_per_s")[-1] > 0 and _scalars(run_dir, "sigma_mean")
    # every 10 steps and at exit, only the newest 2 kept, no temporary files left
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step_00000020.pt",
                                                                     "step_00000024.pt"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert (run_dir / "samples" / "reconstructions_00000024.png").is_file()
    assert (run_dir / "config.yaml").is_file()

    G, loaded = checkpoint.load_inverter(run_dir)
    assert loaded == cfg and not G.training and G.resolution == 16
    z = torch.randn(3, G.num_classes)
    x = G(z, G.sample_noise(3))
    assert x.shape == (3, 3, 16, 16) and x.abs().max() <= 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_inverter_loads_in_the_layout_it_trained_in(tmp_path, synthetic_data, channels_last):
    """A G trained in channels_last is loaded in it (faster on CPU), with the same outputs."""
    import copy

    flag = str(channels_last).lower()
    run_dir = train_inverter(_cfg(tmp_path, synthetic_data, "--steps=2", f"--channels_last={flag}"))
    G, cfg = checkpoint.load_inverter(run_dir)
    assert cfg.run.channels_last is channels_last
    z = torch.randn(4, G.num_classes)
    noise = G.sample_noise(4, generator=torch.Generator().manual_seed(0))
    x = G(z, noise)
    assert x.is_contiguous(memory_format=torch.channels_last) is channels_last
    nchw = copy.deepcopy(G).to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(x, nchw(z, noise), atol=1e-5, rtol=0)


def test_checkpoint_is_weights_only_loadable(tmp_path, synthetic_data):
    run_dir = train_inverter(_cfg(tmp_path, synthetic_data, "--steps=2"))
    path = checkpoint.latest_checkpoint(run_dir)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 2 and {"G", "D", "G_ema", "opt_G", "opt_D", "rng", "noise_rng",
                                  "config"} <= set(ckpt)
    with pytest.raises(ValueError, match="not a fastinv inverter checkpoint"):
        torch.save({"step": 1}, tmp_path / "other.pt")
        checkpoint.load(tmp_path / "other.pt")


def test_existing_run_needs_resume(tmp_path, synthetic_data):
    train_inverter(_cfg(tmp_path, synthetic_data, "--steps=1"))
    with pytest.raises(FileExistsError, match="--resume=true"):
        train_inverter(_cfg(tmp_path, synthetic_data, "--steps=2"))


def test_resume_continues_bit_for_bit(tmp_path, synthetic_data):
    """k + m steps in one go == k steps, stop, resume, m steps (all state, exactly)."""
    over = ["--accumulate=2", "--d_steps=2", "--ema_start=1", "--ckpt_every=100"]
    straight = train_inverter(_cfg(tmp_path / "a", synthetic_data, "--steps=5", *over))
    train_inverter(_cfg(tmp_path / "b", synthetic_data, "--steps=2", *over))
    resumed = train_inverter(_cfg(tmp_path / "b", synthetic_data, "--steps=5", "--resume=true",
                                  *over))
    a = torch.load(checkpoint.latest_checkpoint(straight), weights_only=True)
    b = torch.load(checkpoint.latest_checkpoint(resumed), weights_only=True)
    assert a["step"] == b["step"] == 5 and a["data"] == b["data"]
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"
    for opt in ("opt_G", "opt_D"):
        for i, state in a[opt]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b[opt]["state"][i][k]), f"{opt} state {i}.{k}"
    assert torch.equal(a["noise_rng"][0], b["noise_rng"][0])


def test_sigterm_saves_and_stops(tmp_path, synthetic_data, monkeypatch):
    original = InverterTrainer.train_step

    def step_then_signal(self):
        stats = original(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would preempt the job
        return stats

    monkeypatch.setattr(InverterTrainer, "train_step", step_then_signal)
    run_dir = train_inverter(_cfg(tmp_path, synthetic_data, "--steps=50", "--ckpt_every=100"))
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step_00000002.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_classifier_is_frozen_under_the_aux_logit_loss(tmp_path, synthetic_data):
    cfg = _cfg(tmp_path, synthetic_data, "--aux_logit_weight=1.0")
    trainer = InverterTrainer(cfg, DistInfo())
    stats = trainer.train_step()
    assert stats["aux_logit"] > 0 and math.isfinite(stats["loss_g"])
    assert all(p.grad is None and not p.requires_grad for p in trainer.classifier.parameters())
    assert not trainer.classifier.training
    assert all(p.grad is not None for p in trainer.G.parameters())
    assert all(p.requires_grad for p in trainer.D.parameters())  # re-enabled after the G step


def test_d_steps_and_accumulation_consume_batches(tmp_path, synthetic_data):
    trainer = InverterTrainer(_cfg(tmp_path, synthetic_data, "--d_steps=3", "--accumulate=2"),
                              DistInfo())
    trainer.train_step()
    assert trainer.batches.position + trainer.batches.epoch * len(trainer.batches.loader) == 6


def test_ema_copies_before_start_then_averages(tmp_path, synthetic_data):
    trainer = InverterTrainer(_cfg(tmp_path, synthetic_data, "--ema_start=2", "--ema_decay=0.5"),
                              DistInfo())
    trainer.train_step()  # step 1 < start: a copy
    for (n, p), q in zip(trainer.G.named_parameters(), trainer.G_ema.parameters()):
        assert torch.equal(p, q), n
    before = [q.clone() for q in trainer.G_ema.parameters()]
    trainer.train_step()  # step 2: ema = 0.5 * ema + 0.5 * G
    for p, q, b in zip(trainer.G.parameters(), trainer.G_ema.parameters(), before):
        torch.testing.assert_close(q, 0.5 * b + 0.5 * p)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_run_on_cuda_bf16_channels_last(tmp_path, synthetic_data):
    cfg = _cfg(tmp_path, synthetic_data, "--device=cuda", "--amp=bf16", "--channels_last=true",
               "--steps=4", "--aux_logit_weight=0.1")
    run_dir = train_inverter(cfg)
    for tag in ("loss_d", "loss_g"):
        assert all(math.isfinite(v) for v in _scalars(run_dir, tag))
    G, _ = checkpoint.load_inverter(run_dir, device="cuda")
    z = torch.randn(2, G.num_classes, device="cuda")
    assert G(z, G.sample_noise(2)).is_cuda


def test_torch_layers_train_and_reload(tmp_path, synthetic_data):
    """model.layers=torch (the benchmark baseline) trains and loads back the same way."""
    run_dir = train_inverter(_cfg(tmp_path, synthetic_data, "--layers=torch", "--steps=2"))
    G, cfg = checkpoint.load_inverter(run_dir, ema=False)
    assert cfg.model.layers == "torch" and G.config.layers == "torch"
    assert torch.isfinite(G(torch.randn(2, G.num_classes), G.sample_noise(2))).all()


def test_training_benchmark_runs_the_trainer(tmp_path):
    """benchmarks/bench_train.py drives InverterTrainer with its own in-memory loader: when the
    trainer's loader interface changed (BatchStream's mid-epoch start_batch) every row of it
    "failed" unnoticed, and gpu_check.sh runs it. One eager step of two implementations."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    rows = bt.run_all("cpu", ["fastinv", "reference-eager"], steps=1, warmup=1,
                      override=[f"--out_dir={tmp_path}", "--channels_last=true"])
    for name, row in rows:
        assert row is not None, f"{name} failed (stderr above)"
        assert row["img_per_s"] > 0 and row["batch"] == 16


def test_trainer_folds_a_copy_of_phi_and_steps_adam_fused(tmp_path, synthetic_data):
    """Training runs Φ with its batch norms folded into its convolutions (the same outputs:
    tests/test_fold.py) on a copy: the classifier the caller passed keeps its own modules.
    Adam takes one fused kernel for all parameters on CPU as on CUDA."""
    from fastinv.models.classifiers import load_classifier

    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)
    keys = list(clf.state_dict())
    trainer = InverterTrainer(_cfg(tmp_path, synthetic_data, "--spec=fastinv:small_cnn"),
                              DistInfo(), classifier=clf)
    assert list(clf.state_dict()) == keys
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in clf.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.classifier.modules())
    assert trainer.opt_G.defaults["fused"] and trainer.opt_D.defaults["fused"]
    stats = trainer.train_step()
    assert math.isfinite(stats["loss_g"]) and math.isfinite(stats["loss_d"])
