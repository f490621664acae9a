"""The EMA generator's standing batch-norm statistics (fastinv.train.ema.standing_statistics)
and what the trainer saves with them."""

from __future__ import annotations

import pytest
import torch

from fastinv.models.generator import Generator
from fastinv.train import checkpoint
from fastinv.train.config import load_config
from fastinv.train.ema import _batch_norms, standing_statistics
from fastinv.train.gan import train_inverter
from tests.train_tiny import tiny_dataset


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.mark.parametrize("layers", ["fastinv", "torch"])
def test_standing_statistics_are_the_average_batch_statistics(layers):
    """Every batch norm's running mean / var become the mean over the chunks of its input's
    per-channel batch mean / unbiased variance (momentum None: each chunk counts the same, the
    last one shorter); weights and spectral-norm vectors are untouched; G ends in eval mode
    with its momentum back."""
    torch.manual_seed(0)
    G = Generator(10, resolution=16, ch=4, noise_dim=12, shared_dim=8, layers=layers).double()
    G.train()
    G(torch.randn(8, 10, dtype=torch.float64), G.sample_noise(8).double())  # move u, v, stats
    G.eval()
    norms = _batch_norms(G)
    assert len(norms) >= 4  # the blocks' conditional batch norms and the output batch norm
    momenta = [m.momentum for m in norms]
    seen = {id(m): [] for m in norms}

    def record(module, args):
        x = args[0].double()
        seen[id(module)].append((x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)))

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    before = {k: v.clone() for k, v in G.state_dict().items()
              if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    cond = torch.randn(11, 10, dtype=torch.float64) * 3
    gen = torch.Generator().manual_seed(1)
    assert standing_statistics(G, cond, batch_size=4, generator=gen) == 3  # 4 + 4 + 3
    for h in hooks:
        h.remove()
    assert not G.training and not any(m.training for m in G.modules())
    assert [m.momentum for m in norms] == momenta
    for m in norms:
        means, variances = zip(*seen[id(m)])
        assert len(means) == 3 and int(m.num_batches_tracked) == 3
        torch.testing.assert_close(m.running_mean.double(), torch.stack(means).mean(0))
        torch.testing.assert_close(m.running_var.double(), torch.stack(variances).mean(0))
    for k, v in G.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), f"{k} changed"
    # the same noise and logits give the same statistics: a pure function of the weights
    again = {k: v.clone() for k, v in G.state_dict().items()}
    standing_statistics(G, cond, batch_size=4, generator=torch.Generator().manual_seed(1))
    for k, v in G.state_dict().items():
        assert torch.equal(v, again[k]), k
    assert standing_statistics(G, cond[:0], batch_size=4, generator=gen) == 0


def test_checkpoint_holds_the_ema_with_standing_statistics(tmp_path, synthetic_data):
    """With ``optim.ema_standing_batches`` the saved EMA G differs from a run without it only
    in its batch norms' statistics (counted over that many batches); training itself (G, D)
    is not touched."""
    def run(name, batches):
        cfg = load_config("tiny", [f"--out_dir={tmp_path / name}", f"--root={synthetic_data}",
                                   "--steps=3", "--ckpt_every=3",
                                   f"--ema_standing_batches={batches}"])
        return checkpoint.load(checkpoint.latest_checkpoint(train_inverter(cfg)))

    off, on = run("off", 0), run("on", 2)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for k, v in off["G_ema"].items():
        if k.endswith(stats):
            if k.endswith("running_var"):
                assert not torch.equal(v, on["G_ema"][k]), f"{k}: the live G's statistics kept"
        else:
            assert torch.equal(v, on["G_ema"][k]), k
    for net in ("G", "D"):
        for k, v in off[net].items():
            assert torch.equal(v, on[net][k]), f"{net}.{k}: training changed"
    nums = {int(v) for k, v in on["G_ema"].items() if k.endswith("num_batches_tracked")}
    assert nums == {2}  # two batches of the tiny preset's 8 logits
