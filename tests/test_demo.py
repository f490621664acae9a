"""`fastinv demo --preset tiny` runs the whole pipeline end to end (the CI preset), and the
invert/report subcommands work on what it leaves behind."""

import json

import pytest

from fastinv.cli import main
from fastinv.data import CLASS_NAMES
from tests.invert_tiny import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_demo_leaves_everything_a_user_looks_at(demo_dir):
    for rel in ("data/factors.csv", "classifiers/standard.safetensors", "classifiers/robust.json",
                "factors.json", "summary.json", "report.md", "report.html"):
        assert (demo_dir / rel).is_file(), rel
    for name in ("standard", "robust"):
        d = demo_dir / name
        assert json.loads((d / "classifier.json").read_text())["robust"] == (name == "robust")
        assert any((d / "inverter" / "checkpoints").iterdir())
        assert any((d / "inverter" / "tensorboard").rglob("events.out.tfevents.*"))
        assert (d / "deepsim" / "deepsim.safetensors").is_file()
        for analysis in ("reconstruct", "resample", "misclassified", "shift", "scale", "perturb"):
            assert (d / "analyses" / analysis / "metrics.json").is_file(), (name, analysis)
        methods = json.loads((d / "methods.json").read_text())
        assert {"inverter", "deepsim", "optimization"} <= set(methods)
    factors = json.loads((demo_dir / "factors.json").read_text())
    assert {"real", "inverter", "deepsim"} <= set(factors["standard"])
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert summary["preset"] == "tiny" and summary["total_seconds"] > 0
    stages = summary["stage_seconds"]  # every stage timed, each Φ's evaluation stages by name
    assert {"factor regressor", "analyses for robust", "DeePSiM decoder for standard",
            "method comparison for robust", "report"} <= set(stages)
    assert set(stages) == set(summary["stage_cpu_seconds"])
    steal = summary["cpu_steal_fraction"]  # the host's share of the CPUs, where Linux says
    assert steal is None or 0 <= steal <= 1
    # what the seconds depend on: the CPU and the precision its training ran in
    from fastinv.train.precision import native_bf16

    assert summary["budget_seconds"] is None  # tiny has no budget
    assert summary["cpu"] and summary["cpu_native_bf16"] == native_bf16("cpu")
    assert summary["precision"] == ("bf16 autocast" if native_bf16("cpu") else "float32")
    assert "The paper's findings on this data" in (demo_dir / "report.md").read_text()
    # per-class judge agreement, with the data's class names
    per = json.loads((demo_dir / "standard" / "per_image.json").read_text())
    assert per["class_names"] == list(CLASS_NAMES[:4])  # the tiny preset's 4 classes
    assert "standard: judge agreement per class" in (demo_dir / "report.md").read_text()


def test_demo_refuses_to_overwrite_a_run(demo_dir, capsys):
    assert main(["demo", "--preset", "tiny", "--out", str(demo_dir), "--device", "cpu"]) == 2
    assert "already holds a demo run" in capsys.readouterr().err


def test_tiny_demo_is_inconclusive_on_every_finding(demo_dir):
    """4 GAN steps and classifiers near chance: no verdict may claim anything."""
    from fastinv.invert import report

    runs, factors, _ = report.collect(demo_dir)
    rows = report.findings(runs, factors)
    assert len(rows) >= 4
    assert {v for _, v, _ in rows} == {"inconclusive"}, rows
    assert "inconclusive" in (demo_dir / "report.md").read_text()


def test_demo_scores_every_method_with_the_independent_judge(demo_dir):
    for name in ("standard", "robust"):
        d = demo_dir / name
        methods = json.loads((d / "methods.json").read_text())
        best = "inverter, best of 2"  # the tiny preset's Φ-consistent sampling row
        assert {"inverter", best, "deepsim", "logit NN", "optimization", "real images"} <= set(methods)
        for m in ("inverter", best, "deepsim", "logit NN", "optimization"):
            assert {"judge_vs_label", "judge_vs_judge", "kid"} <= set(methods[m]), m
        per = json.loads((d / "per_image.json").read_text())
        assert len(per["methods"]["inverter"]["psnr"]) == len(per["index"])
        assert (d / "methods.png").is_file() and (d / "factors.png").is_file()
        info = json.loads((d / "classifier.json").read_text())
        judge = info["judge"]  # another architecture (depth / width / family) and seed
        assert (judge["arch"], judge["width"], judge["blocks"]) != (
            info["arch"], info["width"], info["blocks"]) and judge["seed"] != 0
    assert (demo_dir / "classifiers" / "judge.safetensors").is_file()


def test_invert_and_report_commands_on_the_demo_inverter(demo_dir, tmp_path, capsys):
    out = tmp_path / "inv"
    rc = main(["invert", "shift", "--inverter", str(demo_dir / "standard" / "inverter"),
               "--data", str(demo_dir / "data" / "val"), "--out", str(out), "--n", "8",
               "--values", "0,2", "--device", "cpu", "--robust", "no"])
    assert rc == 0
    m = json.loads((out / "analyses" / "shift" / "metrics.json").read_text())
    assert [e["value"] for e in m["per_value"]] == [0.0, 2.0]
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_invert_compare_scores_phi_consistent_sampling(demo_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["invert", "compare", "--inverter", str(demo_dir / "standard" / "inverter"),
            "--data", str(demo_dir / "data" / "val"), "--out", str(out), "--n", "8",
            "--opt-n", "2", "--opt-steps", "2", "--opt-restarts", "1", "--device", "cpu"]
    assert main([*args, "--best-of", "3"]) == 0
    methods = json.loads((out / "methods.json").read_text())
    assert {"inverter", "inverter, best of 3", "optimization"} <= set(methods)
    assert methods["inverter, best of 3"]["n_images"] == 8
    assert main([*args, "--best-of", "0"]) == 2
    assert "--best-of must be >= 1" in capsys.readouterr().err


def _job(x):
    import os

    import torch
    return x, torch.get_num_threads(), os.getpid()


def _bad_job():
    raise ValueError("bad job")


def test_demo_runs_independent_trainings_side_by_side_on_a_cpu():
    # the demo's two inverters train in two spawned processes with
    # half the threads each when the CPU has >= 2 threads; one after the other otherwise
    import os

    import torch

    from fastinv.demo import _run_jobs

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        results = _run_jobs([(_job, "a"), (_job, "b")], "cpu")
        assert [r[0] for r in results] == ["a", "b"]
        assert all(r[1] == 1 and r[2] != os.getpid() for r in results)
        with pytest.raises(ValueError, match="bad job"):
            _run_jobs([(_job, "a"), (_bad_job,)], "cpu")
        torch.set_num_threads(1)
        assert [r[2] for r in _run_jobs([(_job, "a"), (_job, "b")], "cpu")] == [os.getpid()] * 2
    finally:
        torch.set_num_threads(before)


def test_steal_fraction_reads_the_hosts_share_of_the_cpus_from_proc_stat(monkeypatch, tmp_path):
    from pathlib import Path

    from fastinv import demo

    stat = tmp_path / "stat"
    real_read = Path.read_text

    def read(self, *a, **k):
        return real_read(stat if str(self) == "/proc/stat" else self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read)
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 20 60 0 0 0 20 0 0\ncpu0 50 0 10 30 0 0 0 10 0 0\n")
    start = demo._cpu_ticks()
    assert start == (20, 200)
    stat.write_text("cpu  250 0 30 80 0 0 0 40 0 0\n")  # +200 ticks, 20 of them stolen
    assert demo._steal_fraction(start) == pytest.approx(0.1)
    assert demo._steal_fraction(None) is None
    stat.write_text("not a stat file\n")
    assert demo._cpu_ticks() is None and demo._steal_fraction(start) is None


def test_budget_note_says_what_a_cpu_without_native_bf16_costs():
    from fastinv.demo import FLOAT32_SECONDS, budget_note

    assert budget_note("quick", "cpu", bf16=True) == "the quick preset is sized for 5 min on 2 CPU cores"
    note = budget_note("quick", "cpu", bf16=False)
    assert "trains in float32" in note and "sized for 5 min" in note
    assert f"took {FLOAT32_SECONDS['quick'] / 60:.0f} min" in note
    assert budget_note("tiny", "cpu", bf16=False) == ""  # no budget
    assert budget_note("default", "cuda", bf16=False) == ""  # the budgets are CPU budgets
