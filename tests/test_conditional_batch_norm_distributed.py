"""Cross-replica conditional batch norm: 2 gloo processes on CPU, holding batches of different
sizes, give exactly what one process gives on the concatenated batch (outputs, gradients of x,
gain and bias, running statistics), through the op and through the module (the module with
relu=True: torch.relu after the synchronised op against the fused ReLU of one process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastinv import ops
from fastinv.nn import ConditionalBatchNorm2d, SyncBatchNorm2d, convert_sync_cbn

SIZES = [3, 2]  # per-rank batch sizes: unequal on purpose
C, H, W, COND = 5, 3, 2, 4


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    x = torch.randn(n, C, H, W, generator=g, dtype=torch.float64) * 2 + 1
    gain = 1 + 0.3 * torch.randn(n, C, generator=g, dtype=torch.float64)
    bias = torch.randn(n, C, generator=g, dtype=torch.float64)
    weight = torch.randn(n, C, H, W, generator=g, dtype=torch.float64)  # loss = sum(y * weight)
    cond = torch.randn(n, COND, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, gain, bias, weight, cond)]


def _run(x, gain, bias, weight, cond, group):
    leaves = [t.clone().requires_grad_() for t in (x, gain, bias)]
    rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
    y = ops.conditional_batch_norm(*leaves, rm, rv, True, 0.1, 1e-5, process_group=group)
    (y * weight).sum().backward()
    torch.manual_seed(0)
    m = ConditionalBatchNorm2d(C, COND, spectral_norm=False, relu=True).to(x.dtype)
    if group is not None:
        convert_sync_cbn(m, group)
    xm = x.clone().requires_grad_()
    ym = m(xm, cond)
    (ym * weight).sum().backward()
    grads = {f"module.{k}": p.grad for k, p in m.named_parameters()}
    # the plain batch norm on the same op (BigGAN's output BN under cross_replica_bn)
    torch.manual_seed(0)
    bn = SyncBatchNorm2d(C).to(x.dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.process_group = group
    xb = x.clone().requires_grad_()
    yb = bn(xb)
    (yb * weight).sum().backward()
    grads.update({f"module.bn.{k}": p.grad for k, p in bn.named_parameters()})
    return dict(y=y.detach(), gx=leaves[0].grad, ggain=leaves[1].grad, gbias=leaves[2].grad,
                rm=rm, rv=rv, ym=ym.detach(), gxm=xm.grad, m_rm=m.running_mean,
                m_rv=m.running_var, yb=yb.detach(), gxb=xb.grad, bn_rm=bn.running_mean,
                bn_rv=bn.running_var, **grads)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        data = _data()
        lo = sum(SIZES[:rank])
        part = [t[lo : lo + SIZES[rank]] for t in data]
        torch.save(_run(*part, group=dist.group.WORLD), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = _run(*_data(), group=None)
    tol = dict(rtol=1e-9, atol=1e-9)
    for key in ("y", "gx", "ggain", "gbias", "ym", "gxm", "yb", "gxb"):  # per-sample results: concatenate
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), whole[key], **tol, msg=key)
    for key in ("rm", "rv", "m_rm", "m_rv", "bn_rm", "bn_rv"):  # replicated: every rank holds the global value
        for r in ranks:
            torch.testing.assert_close(r[key], whole[key], **tol, msg=key)
    # Parameter gradients are per-rank partial sums (DDP all-reduces them): they add up.
    for key in [k for k in whole if k.startswith("module.")]:
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], whole[key], **tol, msg=key)
