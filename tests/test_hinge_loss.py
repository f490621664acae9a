"""The fused hinge loss against its float64 reference, on every backend that is built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastinv import ops
from tests.conftest import CUDA, TOL, requires_cuda, requires_two_gpus

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _pair(shape_r, shape_f, dtype, device, scale=2.0):
    r = (torch.randn(shape_r, dtype=torch.float64) * scale).to(device, dtype)
    f = (torch.randn(shape_f, dtype=torch.float64) * scale).to(device, dtype)
    return r, f


def _expected_d(r, f):
    r64, f64 = r.double(), f.double()
    return torch.relu(1 - r64).mean() + torch.relu(1 + f64).mean()


def test_cpu_kernel_is_registered():
    info = ops.backend_info()
    assert info["hinge_loss_d"]["cpu"] == "cpp"
    assert info["hinge_loss_g"]["cpu"] == "cpp"
    assert info["hinge_loss_d_backward"]["cpu"] == "cpp"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(
    "shape_r,shape_f", [((1,), (1,)), ((64, 1), (48, 1)), ((7, 3, 5), (2, 5)), ((100_003,), (65_537,))]
)
def test_forward_matches_float64_reference(device, dtype, shape_r, shape_f):
    r, f = _pair(shape_r, shape_f, dtype, device)
    loss_d = ops.hinge_loss_d(r, f)
    loss_g = ops.hinge_loss_g(f)
    assert loss_d.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss_d.shape == () and loss_d.device.type == device
    torch.testing.assert_close(loss_d.double().cpu(), _expected_d(r, f).cpu(), **TOL[dtype])
    torch.testing.assert_close(loss_g.double().cpu(), -f.double().mean().cpu(), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_backward_matches_autograd_of_reference(device, dtype):
    r, f = _pair((300,), (257,), dtype, device)
    r1, f1 = r.clone().requires_grad_(), f.clone().requires_grad_()
    (ops.hinge_loss_d(r1, f1) + 0.5 * ops.hinge_loss_g(f1)).backward()
    r2, f2 = r.double().requires_grad_(), f.double().requires_grad_()
    (_expected_d(r2, f2) - 0.5 * f2.mean()).backward()
    assert r1.grad.dtype == dtype and f1.grad.dtype == dtype
    torch.testing.assert_close(r1.grad.double(), r2.grad, **TOL[dtype])
    torch.testing.assert_close(f1.grad.double(), f2.grad, **TOL[dtype])


@settings(max_examples=25, deadline=None)
@given(
    nr=st.integers(1, 5000),
    nf=st.integers(1, 5000),
    scale=st.floats(0.1, 10.0),
    dtype=st.sampled_from(FLOATS),
)
def test_random_sizes_agree_with_reference(nr, nf, scale, dtype):
    r, f = _pair((nr,), (nf,), dtype, "cpu", scale)
    torch.testing.assert_close(ops.hinge_loss_d(r, f).double(), _expected_d(r, f), **TOL[dtype])
    torch.testing.assert_close(
        ops.hinge_loss_d(r, f), ops.hinge_loss_d_reference(r, f), **TOL[dtype]
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    r, f = _pair((13, 1), (9, 1), torch.float64, device)
    r.requires_grad_(), f.requires_grad_()
    assert torch.autograd.gradcheck(ops.hinge_loss_d, (r, f))
    assert torch.autograd.gradcheck(ops.hinge_loss_g, (f,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    r, f = _pair((16, 1), (8,), dtype, device)
    r.requires_grad_(), f.requires_grad_()
    torch.library.opcheck(torch.ops.fastinv.hinge_loss_d.default, (r, f))
    torch.library.opcheck(torch.ops.fastinv.hinge_loss_g.default, (f,))
    g = torch.tensor(0.7, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.fastinv.hinge_loss_d_backward.default, (g, r.detach(), f.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_fullgraph(device):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def losses(r, f):
        return ops.hinge_loss_d(r, f), ops.hinge_loss_g(f)

    r, f = _pair((32, 1), (32, 1), torch.float32, device)
    r.requires_grad_(), f.requires_grad_()
    ld, lg = losses(r, f)
    (ld + lg).backward()
    torch.testing.assert_close(ld, ops.hinge_loss_d_reference(r, f))
    assert r.grad is not None and f.grad is not None


def test_compiles_fullgraph_inductor():
    fn = torch.compile(lambda r, f: ops.hinge_loss_d(r, f) + ops.hinge_loss_g(f), fullgraph=True)
    r, f = _pair((40,), (24,), torch.float32, "cpu")
    torch.testing.assert_close(fn(r, f), ops.hinge_loss_d_reference(r, f) + ops.hinge_loss_g_reference(f))


def test_forward_is_deterministic():
    r, f = _pair((3_000_001,), (1_000_003,), torch.float32, "cpu")
    first = ops.hinge_loss_d(r, f)
    torch.set_num_threads(1)
    try:
        single = ops.hinge_loss_d(r, f)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert torch.equal(first, ops.hinge_loss_d(r, f))
    assert torch.equal(first, single), "result must not depend on the thread count"


def test_nan_propagates_like_pytorch():
    r = torch.tensor([0.5, float("nan")])
    f = torch.tensor([0.0, -3.0])
    assert torch.isnan(ops.hinge_loss_d(r, f))
    assert torch.isnan(ops.hinge_loss_g(torch.tensor([1.0, float("nan")])))
    # +-inf are not NaN: relu clamps them like torch does
    inf = torch.tensor([float("inf")])
    torch.testing.assert_close(ops.hinge_loss_d(inf, -inf), ops.hinge_loss_d_reference(inf, -inf))


@pytest.mark.parametrize("fn", [ops.hinge_loss_d, ops.hinge_loss_d_reference])
def test_bad_inputs_raise_clear_errors(fn):
    x = torch.randn(4)
    with pytest.raises(ValueError, match="d_real is empty"):
        fn(torch.empty(0), x)
    with pytest.raises(ValueError, match="d_fake is empty"):
        fn(x, torch.empty(0, 1))
    with pytest.raises(TypeError, match="must be a floating tensor"):
        fn(torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="cast them to one dtype"):
        fn(x, x.double())
    with pytest.raises(ValueError, match="empty"):
        ops.hinge_loss_g(torch.empty(0))


@requires_cuda
def test_mismatched_devices_raise():
    with pytest.raises(ValueError, match="same device"):
        ops.hinge_loss_d(torch.randn(4, device="cuda"), torch.randn(4))
    with pytest.raises(ValueError, match="same device"):
        torch.ops.fastinv.hinge_loss_d_backward(torch.tensor(1.0), torch.randn(4, device="cuda"), torch.randn(4))


_BAD = [
    ("empty d_real", "hinge_loss_d", lambda x: (torch.empty(0), x)),
    ("empty d_fake", "hinge_loss_d", lambda x: (x, torch.empty(0, 1))),
    ("integer inputs", "hinge_loss_d", lambda x: (x.long(), x.long())),
    ("integer d_fake", "hinge_loss_d", lambda x: (x, x.long())),
    ("two dtypes", "hinge_loss_d", lambda x: (x, x.double())),
    ("g: empty", "hinge_loss_g", lambda x: (torch.empty(0),)),
    ("g: integer", "hinge_loss_g", lambda x: (x.long(),)),
    ("backward: grad of 2 values", "hinge_loss_d_backward", lambda x: (torch.ones(2), x, x)),
    ("backward: integer grad", "hinge_loss_d_backward", lambda x: (torch.tensor(1), x, x)),
    ("backward: two dtypes", "hinge_loss_d_backward", lambda x: (torch.tensor(1.0), x, x.double())),
]


@pytest.mark.parametrize("what,name,make", _BAD, ids=[b[0] for b in _BAD])
def test_kernel_and_reference_raise_the_same_exception_type(what, name, make):
    from fastinv.ops import hinge_loss as module

    args = make(torch.randn(4))
    with pytest.raises(Exception) as from_kernel:
        getattr(torch.ops.fastinv, name)(*args)
    with pytest.raises(Exception) as from_reference:
        getattr(module, f"{name}_reference")(*args)
    assert from_kernel.type is from_reference.type, (from_kernel.value, from_reference.value)
    assert from_kernel.type in (ValueError, TypeError)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_empty_inputs_returns_empty_gradients(device):
    # the forward never produces them, a direct call may: both devices return, no launch
    gr, gf = torch.ops.fastinv.hinge_loss_d_backward(
        torch.tensor(1.0, device=device), torch.empty(0, device=device), torch.empty(0, 3, device=device)
    )
    assert gr.shape == (0,) and gf.shape == (0, 3) and gr.device.type == device


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_float64_above_a_million_elements(dtype):
    """More elements than the forward's 1024 blocks x 256 threads cover in one sweep, and than
    the backward's grid: every grid-stride loop runs several rounds."""
    r, f = _pair((3_000_017,), (1_200_001, 1), dtype, "cuda")
    torch.testing.assert_close(ops.hinge_loss_d(r, f).double().cpu(), _expected_d(r, f).cpu(), **TOL[dtype])
    torch.testing.assert_close(ops.hinge_loss_g(f).double().cpu(), -f.double().mean().cpu(), **TOL[dtype])
    g = torch.tensor(0.5, device="cuda")
    gr, gf = torch.ops.fastinv.hinge_loss_d_backward(g, r, f)
    wr, wf = torch.ops.fastinv.hinge_loss_d_backward(g.cpu(), r.cpu(), f.cpu())
    torch.testing.assert_close(gr.cpu(), wr)
    torch.testing.assert_close(gf.cpu(), wf)


@requires_two_gpus
def test_cuda_runs_on_the_tensors_device_not_the_current_one():
    r, f = _pair((5000,), (3000,), torch.float32, "cuda:1")
    r.requires_grad_(), f.requires_grad_()
    with torch.cuda.device(0):
        loss = ops.hinge_loss_d(r, f)
        loss.backward()
    assert loss.device == r.device and r.grad.device == r.device
    torch.testing.assert_close(loss.double().cpu(), _expected_d(r, f).cpu(), **TOL[torch.float32])


def test_reference_backend_can_be_forced():
    code = (
        "import fastinv.ops as o, torch, json; "
        "r=torch.randn(10); f=torch.randn(7); "
        "assert torch.allclose(o.hinge_loss_d(r,f), o.hinge_loss_d_reference(r,f)); "
        "print(json.dumps(o.backend_info()))"
    )
    env = dict(os.environ, FASTINV_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert '"cpu": "cpp"' not in out.stdout
    assert '"hinge_loss_d": {"cpu": "reference", "cuda": "reference"}' in out.stdout


def test_import_survives_a_broken_extension(tmp_path):
    # A fastinv/_C that fails to import must only warn; the references then serve the ops.
    import fastinv

    pkg = tmp_path / "fastinv"
    pkg.mkdir()
    src = os.path.dirname(fastinv.__file__)
    for name in os.listdir(src):
        if name.endswith(".py") or name in ("ops",):
            target = pkg / name
            os.symlink(os.path.join(src, name), target)
    (pkg / "_C.py").write_text("raise ImportError('simulated broken build')\n")
    code = (
        "import warnings, torch; warnings.simplefilter('always');\n"
        "import fastinv.ops as o\n"
        "assert o.backend_info()['hinge_loss_d']['cpu'] == 'reference'\n"
        "assert 'simulated broken build' in o.extension_status()['reason']\n"
        "print(float(o.hinge_loss_d(torch.ones(3), -torch.ones(3))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "could not be loaded" in out.stderr
    assert float(out.stdout.strip()) == 0.0


@pytest.mark.skipif(CUDA, reason="checks the CPU-only machine's view")
def test_cuda_column_reports_the_compiled_kernel_or_reference():
    info = ops.backend_info()["hinge_loss_d"]["cuda"]
    expected = "cuda" if ops.extension_status()["with_cuda"] else "reference"
    assert info == expected
