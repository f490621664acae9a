"""The CPU loops' instruction sets (csrc/cpu/capability.cpp): each one this CPU runs serves
every op within tolerance of the reference, FASTINV_CPU_CAPABILITY picks it, and a bad value
says what to set. The capability is read once per process, so each runs in a subprocess
(tests/cpu_capability_check.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastinv
from fastinv import info, ops

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["default", "avx2", "avx512"]
STATUS = ops.extension_status()
pytestmark = pytest.mark.skipif(not STATUS["loaded"], reason="needs the compiled extension fastinv._C")
RUNS_HERE = ORDER[: ORDER.index(STATUS["cpu_capability_max"]) + 1] if STATUS["loaded"] else []


def _python(args: list[str], capability: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTINV_CPU_CAPABILITY", "FASTINV_BACKEND")}
    if capability is not None:
        env["FASTINV_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = str(ROOT)  # this checkout's fastinv, not an installed one
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


_CHECKS: dict[str, tuple[dict, dict]] = {}


def _check(capability: str, tmp_path_factory) -> tuple[dict, dict]:
    """The child's report and outputs for one capability (run once per session)."""
    if capability not in _CHECKS:
        path = tmp_path_factory.mktemp("cpu_capability") / f"{capability}.pt"
        run = _python(["-m", "tests.cpu_capability_check", str(path)], capability)
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout.strip().splitlines()[-1])
        _CHECKS[capability] = report, torch.load(path, weights_only=True)
    return _CHECKS[capability]


@pytest.mark.parametrize("capability", ORDER)
def test_each_capability_matches_the_reference_forward_and_backward(capability, tmp_path_factory):
    if capability not in RUNS_HERE:
        pytest.skip(f"this CPU runs up to {STATUS['cpu_capability_max']}")
    report, _ = _check(capability, tmp_path_factory)
    assert report["fastinv"] == fastinv.__file__
    assert report["cpu_capability"] == capability
    assert set(report["serves"].values()) == {"cpp"}, report["serves"]
    assert report["failures"] == [], "\n".join(report["failures"][:20])


@pytest.mark.parametrize("capability", ORDER[1:])
def test_wider_capabilities_sum_the_hinge_loss_in_the_baselines_order(capability, tmp_path_factory):
    # The hinge sums keep 16 explicit lanes, and its gradient is a product: vector width does not
    # change a bit. (CBN and SN differ in the last bits: more lanes per reduction, and FMA.)
    if capability not in RUNS_HERE:
        pytest.skip(f"this CPU runs up to {STATUS['cpu_capability_max']}")
    _, base = _check("default", tmp_path_factory)
    _, wide = _check(capability, tmp_path_factory)
    hinge = [k for k in base if k.startswith("hinge")]
    assert hinge
    for key in hinge:
        for a, b in zip(base[key], wide[key]):
            assert torch.equal(a, b), key
    for key in base:
        for a, b in zip(base[key], wide[key]):
            assert a.dtype == b.dtype and a.shape == b.shape, key


def test_unknown_capability_is_an_error_naming_the_values():
    run = _python(["-c", "import fastinv.ops"], "avx3")
    assert run.returncode != 0
    assert "ValueError: FASTINV_CPU_CAPABILITY='avx3' is not a CPU capability fastinv knows" in run.stderr
    assert "default" in run.stderr and "avx2" in run.stderr and "avx512" in run.stderr


def test_a_cap_above_the_cpu_warns_and_uses_the_widest_it_runs():
    if STATUS["cpu_capability_max"] == "avx512":
        pytest.skip("this CPU runs every capability fastinv has")
    code = "import fastinv.ops as o; print(o.extension_status()['cpu_capability'])"
    run = _python(["-W", "always", "-c", code], "AVX512 ")  # case and spaces do not matter
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == STATUS["cpu_capability_max"]
    assert "RuntimeWarning: fastinv: FASTINV_CPU_CAPABILITY=avx512 asks for avx512" in run.stderr


@pytest.mark.skipif(bool(os.environ.get("FASTINV_CPU_CAPABILITY", "").strip()),
                    reason="FASTINV_CPU_CAPABILITY is set for this run")
def test_without_a_cap_the_widest_the_cpu_runs_serves():
    assert STATUS["cpu_capability"] == STATUS["cpu_capability_max"]
    assert STATUS["cpu_capability"] in ORDER


def test_fastinv_info_names_the_capability(capsys):
    info.run(argparse.Namespace(json=False))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CPU kernels:")]
    assert line and line[0].startswith(f"CPU kernels: {STATUS['cpu_capability']} (")
    assert "FASTINV_CPU_CAPABILITY" in line[0]
