"""Two gloo ranks on CPU under torchrun: DDP keeps G, D and the EMA identical across ranks,
through a resume too, while each rank reads its own shard of the data; with cross_replica_bn
every batch norm of G (CBNs and the output BN) computes global statistics over gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _worker(out: str) -> None:
    from fastinv.train import distributed
    from fastinv.train.config import load_config
    from fastinv.train.gan import InverterTrainer, train_inverter

    info = distributed.setup("cpu")
    over = [f"--out_dir={out}/run", "--synthetic_n=40", "--accumulate=2", "--ema_start=1"]
    # the full path: rank 0 makes the synthetic data, DDP training, checkpoint at exit
    train_inverter(load_config("tiny", over + ["--steps=2"]))
    # continue from that checkpoint on both ranks, one more step
    trainer = InverterTrainer(load_config("tiny", over + ["--steps=3", "--resume=true"]), info)
    assert trainer.try_resume() and trainer.step == 2
    trainer.train_step()
    loader = trainer.batches.loader
    loader.set_epoch(0)
    first = next(iter(loader))["index"]
    # cross-replica BN over gloo: every batch norm of G (the CBNs and the output BN) syncs
    from fastinv.nn import SyncBatchNorm2d

    synced = InverterTrainer(load_config("tiny", [f"--out_dir={out}/sync", "--synthetic_n=40",
                                                  "--cross_replica_bn=true", "--steps=1"]), info)
    assert isinstance(synced.G.output_bn, SyncBatchNorm2d)
    synced.train_step()
    # reuse_fakes: "same" runs G's forward before D's DDP update; "previous" keeps each rank's
    # last images, gathered into the checkpoint and handed back to their rank on resume
    reuse = [f"--out_dir={out}/reuse", "--synthetic_n=40", "--reuse_fakes=previous"]
    train_inverter(load_config("tiny", reuse + ["--steps=2"]))
    resumed = InverterTrainer(load_config("tiny", reuse + ["--steps=3", "--resume=true"]), info)
    assert resumed.try_resume() and resumed._last_fakes is not None
    last = resumed._last_fakes[0].clone()
    resumed.train_step()
    same = InverterTrainer(load_config("tiny", [f"--out_dir={out}/same", "--synthetic_n=40",
                                                "--reuse_fakes=same", "--steps=1"]), info)
    same.train_step()
    # R1 (a double backward around the DDP wrapper): its gradient is averaged over ranks too
    r1 = InverterTrainer(load_config("tiny", [f"--out_dir={out}/r1", "--synthetic_n=40",
                                              "--r1_gamma=1", "--r1_every=1", "--steps=2"]), info)
    r1.train_step()
    r1.train_step()
    torch.save({"r1_D": r1.D.state_dict(),
                "G": trainer.G.state_dict(), "D": trainer.D.state_dict(),
                "last_fakes": last, "reuse_G": resumed.G.state_dict(),
                "same_G": same.G.state_dict(),
                "G_ema": trainer.G_ema.state_dict(), "first_index": first,
                "sync_G": synced.G.state_dict(),
                "world": info.world_size}, f"{out}/rank{info.rank}.pt")
    distributed.cleanup()


@pytest.mark.distributed
def test_two_gloo_ranks_keep_identical_parameters(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    for net in ("G", "D", "G_ema", "r1_D"):
        for k, v in r0[net].items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")) and net != "D":
                continue  # batch statistics are per rank (cross_replica_bn off), broadcast by DDP
            assert torch.equal(v, r1[net][k]), f"{net}.{k} differs between ranks"
    assert set(r0["first_index"].tolist()).isdisjoint(r1["first_index"].tolist())
    # with cross_replica_bn the batch statistics are global: equal on both ranks (without it
    # they differ, each rank's own shard: checked by hand), the output BN's too
    stats = [k for k in r0["sync_G"] if k.endswith(("running_mean", "running_var"))]
    assert any(k.startswith("output_bn.") for k in stats)
    for k in r0["sync_G"]:
        torch.testing.assert_close(r0["sync_G"][k], r1["sync_G"][k], rtol=1e-6, atol=1e-6, msg=k)
    assert r0["sync_G"]["output_bn.running_mean"].abs().sum() > 0  # a step moved them from 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000002.pt").is_file()
    # reuse_fakes: each rank resumed with its own last images; G stays identical across ranks
    ckpt = torch.load(tmp_path / "reuse" / "checkpoints" / "step_00000002.pt", weights_only=True)
    images = ckpt["last_fakes"][0]
    assert len(images) == 2 and not torch.equal(images[0], images[1])
    assert torch.equal(r0["last_fakes"], images[0]) and torch.equal(r1["last_fakes"], images[1])
    for net in ("reuse_G", "same_G"):
        for k, v in r0[net].items():
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(v, r1[net][k]), f"{net}.{k} differs between ranks"


if __name__ == "__main__":
    _worker(sys.argv[1])
