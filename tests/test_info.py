"""`fastinv info`: which GPU target of the extension a GPU runs."""

from __future__ import annotations

import pytest

from fastinv import ops
from fastinv.info import kernel_image_for

DEFAULT = ["sm_80", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize(
    "capability,expected",
    [
        ((8, 0), "sm_80"), ((8, 6), "sm_80"), ((9, 0), "sm_90"), ((10, 0), "sm_100"), ((10, 3), "sm_100"),
        ((12, 0), "sm_120"), ((12, 1), "sm_120"),
        ((13, 0), "compute_120 (PTX, compiled by the driver)"),
        ((7, 5), None), ((11, 0), None),
    ],
)
def test_a_gpu_runs_same_major_machine_code_or_older_ptx(capability, expected):
    assert kernel_image_for(capability, DEFAULT) == expected


def test_a_build_for_one_gpu_serves_no_other_generation():
    assert kernel_image_for((9, 0), ["sm_80"]) is None
    assert kernel_image_for((8, 9), ["sm_86"]) == "sm_86"


def test_the_extension_reports_its_targets():
    status = ops.extension_status()
    if status["with_cuda"]:
        assert status["cuda_archs"], "setup.py records the targets it compiled"
        assert all(a.startswith(("sm_", "compute_")) for a in status["cuda_archs"])
    else:
        assert status["cuda_archs"] == []


def test_cpu_line_names_the_precision_amp_auto_trains_in(monkeypatch):
    import fastinv.train.precision as precision
    from fastinv.info import cpu_line, cpu_model

    assert cpu_model()  # /proc/cpuinfo's model name, or platform's answer
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert cpu_line().endswith("no native bf16: amp=auto trains in float32")
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert "amp=auto trains in bf16" in cpu_line()
