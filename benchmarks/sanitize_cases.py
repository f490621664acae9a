"""One tiny case of every CUDA kernel path of fastinv, for compute-sanitizer (memcheck,
racecheck, synccheck) in benchmarks/gpu_check.sh::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --kernel-name kns=fastinv \
        python benchmarks/sanitize_cases.py

Shapes are as small as each path allows (the sanitizer runs kernels 10-100x slower). Every
case also checks its result against the CPU kernel, so the run fails on a wrong value as well
as on a reported hazard. Without a GPU it says so and exits 0. ``--list`` prints the cases.
Not covered: the 64-bit index variants of the elementwise kernels (they need >= 2^32 elements).
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastinv.ops  # noqa: F401  (defines the ops, loads the kernels)

F = torch.ops.fastinv
CASES: list[tuple[str, object]] = []


def case(name: str):
    def register(fn):
        CASES.append((name, fn))
        return fn

    return register


def _close(got, want, rtol=1e-4, atol=1e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=rtol, atol=atol)


def _cbn_inputs(shape, dtype, layout, offset=0):
    g = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    numel = torch.Size(shape).numel()
    x = (torch.randn(numel + offset, generator=g, dtype=torch.float64) + 2).to(dtype)[offset:].view(shape)
    x = x.contiguous(memory_format=layout) if offset == 0 else x
    gain = (1 + 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)
    bias = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    return x, gain, bias, dy


def _cbn_case(shape, dtype=torch.float32, layout=torch.contiguous_format, offset=0, training=True, relu=False):
    def run():
        x, gain, bias, dy = _cbn_inputs(shape, dtype, layout, offset)
        c = shape[1]
        rm, rv = torch.zeros(c), torch.ones(c) + 0.5
        cpu = F.conditional_batch_norm(x, gain, bias, rm, rv, training, 1e-5, relu)
        dev = F.conditional_batch_norm(x.cuda(), gain.cuda(), bias.cuda(), rm.cuda(), rv.cuda(), training, 1e-5, relu)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.bfloat16, torch.float16) else {}
        _close(dev, cpu, **tol)
        _, mean, invstd, _ = cpu
        bwd_cpu = F.conditional_batch_norm_backward(dy, x, gain, mean, invstd, training, relu, bias)
        bwd_dev = F.conditional_batch_norm_backward(dy.cuda(), x.cuda(), gain.cuda(), mean.cuda(), invstd.cuda(),
                                                    training, relu, bias.cuda())
        _close(bwd_dev, bwd_cpu, **(tol or dict(rtol=1e-4, atol=1e-4)))

    return run


# conditional batch norm: forward (held slab / stats+finalize+apply, vector / scalar, both
# layouts, eval), backward (NCHW run groups / split runs, channels_last lanes), every dtype
case("cbn nchw held slab fp32")(_cbn_case((4, 8, 4, 4)))
case("cbn nchw two-pass fp32 (split runs in backward)")(_cbn_case((2, 4, 96, 96)))
case("cbn nchw scalar (odd H*W)")(_cbn_case((3, 5, 7, 9)))
case("cbn nchw misaligned view")(_cbn_case((2, 4, 6, 6), offset=1))
case("cbn nchw bf16")(_cbn_case((2, 8, 16, 16), torch.bfloat16))
case("cbn nchw fp16")(_cbn_case((2, 8, 16, 16), torch.float16))
case("cbn nchw fp64")(_cbn_case((2, 8, 16, 16), torch.float64))
case("cbn nchw eval")(_cbn_case((2, 8, 16, 16), training=False))
case("cbn nhwc fp32 vector")(_cbn_case((4, 24, 6, 6), layout=torch.channels_last))
case("cbn nhwc bf16 vector, 12 of 16 lanes")(_cbn_case((4, 96, 4, 4), torch.bfloat16, torch.channels_last))
case("cbn nhwc fp16 vector")(_cbn_case((2, 16, 5, 5), torch.float16, torch.channels_last))
case("cbn nhwc fp64 vector")(_cbn_case((2, 6, 5, 5), torch.float64, torch.channels_last))
case("cbn nhwc scalar (C odd)")(_cbn_case((3, 5, 7, 9), layout=torch.channels_last))
case("cbn nhwc eval")(_cbn_case((2, 32, 4, 4), torch.bfloat16, torch.channels_last, training=False))
case("cbn H=W=1")(_cbn_case((4, 3, 1, 1)))
# the fused ReLU: bias read by both backward passes (vector and scalar loads), held slab
case("cbn relu nchw held slab fp32")(_cbn_case((4, 8, 4, 4), relu=True))
case("cbn relu nchw two-pass bf16")(_cbn_case((2, 4, 96, 96), torch.bfloat16, relu=True))
case("cbn relu nhwc bf16 vector")(_cbn_case((4, 96, 4, 4), torch.bfloat16, torch.channels_last, relu=True))
case("cbn relu nhwc scalar (C odd), eval")(_cbn_case((3, 5, 7, 9), layout=torch.channels_last, training=False,
                                                      relu=True))
case("cbn relu misaligned view")(_cbn_case((2, 4, 6, 6), offset=1, relu=True))


@case("cbn split ops and running-stat update (fused and strided)")
def _():
    x, gain, bias, dy = _cbn_inputs((3, 16, 5, 8), torch.float32, torch.channels_last)
    xc, gc, bc, dyc = x.cuda(), gain.cuda(), bias.cuda(), dy.cuda()
    mean, var = F.conditional_batch_norm_stats(xc)
    _close((mean, var), F.conditional_batch_norm_stats(x))
    invstd = (var + 1e-5).rsqrt()
    _close((F.conditional_batch_norm_apply(xc, gc, bc, mean, invstd),),
           (F.conditional_batch_norm_apply(x, gain, bias, mean.cpu(), invstd.cpu()),))
    gg, gb = F.conditional_batch_norm_backward_reduce(dyc, xc, mean, invstd)
    _close((gg, gb), F.conditional_batch_norm_backward_reduce(dy, x, mean.cpu(), invstd.cpu()))
    sa, sb = (gc * gb).sum(0), (gc * gg).sum(0)
    got = F.conditional_batch_norm_backward_elemt(dyc, xc, gc, mean, invstd, sa, sb, 120)
    want = F.conditional_batch_norm_backward_elemt(dy, x, gain, mean.cpu(), invstd.cpu(), sa.cpu(), sb.cpu(), 120)
    _close((got,), (want,))
    for rm, rv in [(torch.zeros(16), torch.ones(16)), (torch.zeros(32)[::2], torch.ones(16).double())]:
        rmc, rvc = rm.cuda(), rv.cuda()
        F.conditional_batch_norm_update_running(rmc, rvc, mean, var, 120, 0.1)
        F.conditional_batch_norm_update_running(rm, rv, mean.cpu(), var.cpu(), 120, 0.1)
        _close((rmc, rvc), (rm, rv))


# hinge loss: the one-launch two-segment reduction (several blocks and one), the backward
def _hinge_case(nr, nf, dtype=torch.float32):
    def run():
        g = torch.Generator().manual_seed(0)
        r = (2 * torch.randn(nr, generator=g)).to(dtype)
        f = (2 * torch.randn(nf, generator=g)).to(dtype)
        _close((F.hinge_loss_d(r.cuda(), f.cuda()), F.hinge_loss_g(f.cuda())),
               (F.hinge_loss_d(r, f), F.hinge_loss_g(f)))
        grad = torch.tensor(0.7)
        _close(F.hinge_loss_d_backward(grad.cuda(), r.cuda(), f.cuda()), F.hinge_loss_d_backward(grad, r, f))

    return run


case("hinge one block per input")(_hinge_case(7, 5))
case("hinge several blocks, bf16")(_hinge_case(3000, 1500, torch.bfloat16))


# spectral norm: multi-tensor table, row_dot / col_dot (several chunks and column blocks) with
# their last-block finishes, eval, scale, gw_dot and grad
def _sn_case(shapes, n_iter):
    def run():
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(s, generator=g) for s in shapes]
        us = [torch.nn.functional.normalize(torch.randn(w.shape[0], generator=g), dim=0) for w in ws]
        vs = [torch.nn.functional.normalize(torch.randn(w.numel() // w.shape[0], generator=g), dim=0) for w in ws]
        cpu = F.spectral_norm(ws, us, vs, n_iter, 1e-12)
        dev = F.spectral_norm([w.cuda() for w in ws], [u.cuda() for u in us], [v.cuda() for v in vs], n_iter, 1e-12)
        _close(dev[0] + dev[1] + dev[2] + [dev[3]], cpu[0] + cpu[1] + cpu[2] + [cpu[3]])
        grads = [torch.randn(w.shape, generator=g) for w in ws]
        _, u1, v1, sig = cpu
        want = F.spectral_norm_backward(grads, ws, u1, v1, sig)
        got = F.spectral_norm_backward([t.cuda() for t in grads], [w.cuda() for w in ws], [u.cuda() for u in u1],
                                       [v.cuda() for v in v1], sig.cuda())
        _close(got, want)

    return run


case("spectral norm train, 3 weights (chunks x column blocks)")(_sn_case([(130, 300), (16, 3, 3, 3), (3, 5)], 1))
case("spectral norm eval")(_sn_case([(70, 40), (2, 2)], 0))
case("spectral norm 2 iterations, tall weight")(_sn_case([(200, 3)], 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(name for name, _ in CASES))
        return 0
    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA GPU visible; nothing to check")
        return 0
    info = fastinv.ops.backend_info()
    if info["conditional_batch_norm"]["cuda"] != "cuda":
        print("sanitize_cases: fastinv._C has no CUDA kernels (build with FASTINV_CUDA=1)")
        return 1
    failed = 0
    for name, fn in CASES:
        try:
            fn()
            torch.cuda.synchronize()
            print(f"ok    {name}", flush=True)
        except Exception as exc:  # report every case, then fail
            failed += 1
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"sanitize_cases: {len(CASES) - failed}/{len(CASES)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
