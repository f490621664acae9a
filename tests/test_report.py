"""The report renders from a run directory, and its verdicts follow the numbers."""

import json

import numpy as np
import pytest
import torch

from fastinv.invert import analyses, report
from fastinv.invert.baselines import OptimizationConfig
from fastinv.invert.evaluate import compare_methods, run_analyses, write_classifier_info
from tests.invert_tiny import one_thread, tiny_pair

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fake_run(root, *, diff, val_accuracy=0.95, judge=0.9, n=40, seed=0, noise_scale=1.0,
              nn_r2=None, probe_r2=None, within_r=None, options=None):
    """A hand-made run whose per-image numbers differ by ``diff`` in the paper's direction
    (diff > 0), against it (diff < 0) or not at all (diff = 0: noise only)."""
    rng = np.random.default_rng(seed)
    index = list(range(100, 100 + n))
    base_psnr, base_std = rng.normal(15, 1, n), rng.uniform(0.05, 0.1, n)
    for name, robust in (("robust", True), ("standard", False)):
        sign = 1 if robust else 0
        psnr = base_psnr + sign * diff + rng.normal(0, 0.3, n)
        std = (base_std - sign * diff * 0.01 + rng.normal(0, 0.003, n)) * noise_scale
        _write(root / name / "classifier.json",
               {"name": name, "robust": robust, "val_accuracy": val_accuracy,
                **({"inverter_options": options} if options else {})})
        _write(root / name / "methods.json", {"inverter": {"psnr": float(psnr.mean()),
                                                           "judge_vs_label": judge}})
        _write(root / name / "per_image.json",
               {"index": index, "methods": {"inverter": {"psnr": psnr.tolist()}}})
        _write(root / name / "analyses" / "resample" / "metrics.json",
               {"noise_std": float(std.mean()), "noise_std_per_image": std.tolist(), "index": index})
        own = rng.normal(14, 0.5, 8)
        _write(root / name / "analyses" / "misclassified" / "metrics.json",
               {"n_misclassified": 8, "psnr_per_image": (own + diff).tolist(),
                "psnr_vs_other_per_image": own.tolist()})
    r2 = {"mean": 0.3 * diff, "lo": 0.3 * diff - 0.05, "hi": 0.3 * diff + 0.05, "n": n}
    intervals = {"inverter": {"x": r2}}
    if nn_r2 is not None:  # the logit NN's R² of x
        intervals["logit NN"] = {"x": {"mean": nn_r2, "lo": nn_r2 - 0.05, "hi": nn_r2 + 0.05, "n": n}}
    if probe_r2 is not None:  # the logit probe's R² of x
        intervals["logit probe"] = {"x": {"mean": probe_r2, "lo": probe_r2 - 0.05,
                                          "hi": probe_r2 + 0.05, "n": n}}
    within = {} if within_r is None else {"_within_r": {"inverter": {"x": {
        "mean": within_r, "lo": within_r - 0.05, "hi": within_r + 0.05, "n": n, "level": 0.995}}}}
    _write(root / "factors.json", {"standard": {"real": {"x": 0.9}, "inverter": {"x": r2["mean"]},
                                                "_intervals": intervals, **within}})


def _verdicts(root):
    runs, factors, _ = report.collect(root)
    return {claim.split()[0]: verdict for claim, verdict, _ in report.findings(runs, factors)}


def test_verdict_reproduced_when_every_interval_excludes_zero_in_the_papers_direction(tmp_path):
    _fake_run(tmp_path, diff=1.0)
    assert _verdicts(tmp_path) == {"Robust": "reproduced", "Noise": "reproduced",
                                   "Misclassified": "reproduced", "Logits": "reproduced"}


def test_verdict_contradicted_when_the_intervals_exclude_zero_the_other_way(tmp_path):
    _fake_run(tmp_path, diff=-1.0)
    assert _verdicts(tmp_path) == {"Robust": "contradicted", "Noise": "contradicted",
                                   "Misclassified": "contradicted",
                                   # an R² below 0 is no proof a factor is absent (below)
                                   "Logits": "inconclusive"}


def test_verdict_inconclusive_when_the_intervals_include_zero(tmp_path):
    _fake_run(tmp_path, diff=0.0)
    assert set(_verdicts(tmp_path).values()) == {"inconclusive"}


def test_verdict_inconclusive_when_a_quality_gate_fails_whatever_the_interval(tmp_path):
    _fake_run(tmp_path / "weak_clf", diff=1.0, val_accuracy=0.5)
    assert set(_verdicts(tmp_path / "weak_clf").values()) == {"inconclusive"}
    _fake_run(tmp_path / "weak_inv", diff=1.0, judge=0.2)
    runs, factors, _ = report.collect(tmp_path / "weak_inv")
    rows = report.findings(runs, factors)
    assert {v for _, v, _ in rows} == {"inconclusive"}
    assert all("judge agreement" in e for _, _, e in rows)


def test_noise_finding_needs_an_inverter_that_uses_its_noise(tmp_path):
    # the same paired difference, but both inverters' draws barely move (mode collapse)
    _fake_run(tmp_path, diff=1.0, noise_scale=0.3)
    runs, factors, _ = report.collect(tmp_path)
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Noise"][0] == "inconclusive" and "noise std" in rows["Noise"][1]
    assert rows["Robust"][0] == "reproduced"  # the other findings keep their verdicts


@pytest.mark.parametrize("diff", [1.0, -1.0])
def test_noise_finding_is_inconclusive_when_the_inverter_was_paid_to_use_its_noise(tmp_path,
                                                                                    diff):
    _fake_run(tmp_path, diff=diff, options={"mode seeking": 1.0, "D pooling": "mean"})
    runs, factors, _ = report.collect(tmp_path)
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Noise"][0] == "inconclusive" and "mode seeking" in rows["Noise"][1]
    assert rows["Robust"][0] == ("reproduced" if diff > 0 else "contradicted")
    # other options do not touch the noise finding
    _fake_run(tmp_path / "other", diff=diff, options={"D pooling": "mean"})
    assert _verdicts(tmp_path / "other")["Noise"] == ("reproduced" if diff > 0 else "contradicted")


def test_factors_the_logit_nn_reads_are_not_evidence_against_the_paper(tmp_path):
    _fake_run(tmp_path / "nn_reads", diff=-1.0, nn_r2=0.5)
    runs, factors, _ = report.collect(tmp_path / "nn_reads")
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Logits"][0] == "inconclusive" and "logit NN" in rows["Logits"][1]
    _fake_run(tmp_path / "probe_reads", diff=-1.0, nn_r2=-0.1, probe_r2=0.6)
    runs, factors, _ = report.collect(tmp_path / "probe_reads")
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Logits"][0] == "inconclusive"
    assert "the logits carry x (logit probe R² +0.6" in rows["Logits"][1]
    assert "logit NN" not in rows["Logits"][1].split("inverter outputs")[1]  # not a reader here


def test_factor_finding_is_never_contradicted_by_r2_below_zero(tmp_path):
    # neither the inverter's outputs nor the logits (NN, probe) give an R² interval above 0:
    # R² < 0 says the regressor reads x̂ worse than a constant guess, not that the logits
    # lack the factor (a factor that follows x's weakly but varies more scores below 0)
    _fake_run(tmp_path, diff=-1.0, nn_r2=-0.5, probe_r2=-0.2)
    runs, factors, _ = report.collect(tmp_path)
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Logits"][0] == "inconclusive"
    assert "no factor's R² interval lies above 0" in rows["Logits"][1]


def test_factor_drawn_weakly_within_the_class_is_reproduced_despite_r2_below_zero(tmp_path):
    # R² below 0 (diff -1) but x̂'s factor follows x's within Φ's class: the factor can be
    # read off the reconstructions beyond the class, which is the paper's claim
    _fake_run(tmp_path / "follows", diff=-1.0, nn_r2=-0.5, within_r=0.2)
    runs, factors, _ = report.collect(tmp_path / "follows")
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Logits"][0] == "reproduced"
    assert "x̂ follows x within Φ's class for x (r +0.2 [+0.15, +0.25], 99.5% interval)" in rows["Logits"][1]
    text = report.write_report(tmp_path / "follows")[0].read_text()
    assert "(within-class r)" in text and "| x | +0.2 [+0.15, +0.25] |" in text
    # the logits carry x, x̂ does not follow it: inconclusive, and the r says so
    _fake_run(tmp_path / "not", diff=-1.0, probe_r2=0.6, within_r=0.0)
    runs, factors, _ = report.collect(tmp_path / "not")
    rows = {c.split()[0]: (v, e) for c, v, e in report.findings(runs, factors)}
    assert rows["Logits"][0] == "inconclusive"
    assert "x̂ does not follow x: x r +0 [-0.05, +0.05]" in rows["Logits"][1]


def test_findings_without_evidence_are_not_tested(tmp_path):
    _write(tmp_path / "only" / "analyses" / "reconstruct" / "metrics.json", {"psnr": 10.0, "ssim": 0.1})
    v = _verdicts(tmp_path)
    assert set(v.values()) == {"not tested"}


def test_report_renders_tables_and_figures_from_real_analyses(tmp_path):
    for i, (name, robust) in enumerate((("standard", False), ("robust", True))):
        G, C = tiny_pair(seed=i, resolution=16)
        torch.manual_seed(10 + i)
        data = analyses.Images.from_images(C, torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 4)
        write_classifier_info(tmp_path / name, {"name": name, "robust": robust, "val_accuracy": 0.5})
        run_analyses(G, C, data, tmp_path / name / "analyses", k=2,
                     sweeps={"shift": [0.0, 1.0], "scale": [1.0, 2.0], "perturb": [0.0, 1.0]})
        res, _ = compare_methods(C, data, {"inverter": G}, tmp_path / name / "methods.json",
                                 optimization=OptimizationConfig(steps=3, restarts=1), n_optimization=4)
        assert set(res) == {"inverter", "inverter_opt_subset", "optimization"}
    md, htm = report.write_report(tmp_path)
    text = md.read_text()
    assert "The paper's findings on this data" in text and "| standard | inverter |" in text
    assert "not computed" in text  # LPIPS / FID without weights
    for rel in ("standard/analyses/reconstruct/reconstruct.png", "robust/analyses/shift/shift_curves.png"):
        assert f"]({rel})" in text and (tmp_path / rel).is_file()
    page = htm.read_text()
    assert page.startswith("<!doctype html>") and page.count("<table>") >= 4 and "<img src=" in page


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no"):
        report.write_report(tmp_path)


def test_report_cautions_about_classifiers_near_chance(tmp_path):
    _fake_run(tmp_path, diff=1.0)
    _write(tmp_path / "robust" / "classifier.json",
           {"name": "robust", "robust": True, "val_accuracy": 0.3, "num_classes": 4})
    runs, _, _ = report.collect(tmp_path)
    assert report.weak_classifiers(runs) == [
        "robust reaches 30.0% validation accuracy on 4 classes (chance 25.0%)"]
    md, _ = report.write_report(tmp_path)
    assert "Caution: robust reaches 30.0%" in md.read_text()


def test_factor_table_rows_are_factors_not_the_interval_entries_method_names(tmp_path):
    _fake_run(tmp_path, diff=1.0)
    text = report.write_report(tmp_path)[0].read_text()
    table = text.split("Factor retention")[1].split("\n## ")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["factor", "x"]  # no "inverter" row from factors.json's "_intervals"


def test_judge_agreement_per_class_is_the_mean_over_that_class_images(tmp_path):
    _fake_run(tmp_path, diff=1.0)
    labels = [0, 0, 1, 1, 1, 2]
    _write(tmp_path / "standard" / "per_image.json",
           {"index": list(range(6)), "labels": labels, "class_names": ["disc", "star", "ring"],
            "methods": {"inverter": {"judge_vs_label": [1, 0, 1, 1, 0, 0]},
                        "logit NN": {"judge_vs_label": [1, 1, 1, 1, 1, 1]},
                        "deepsim": {"psnr": [9.0] * 6}}})  # no judge values: no column
    runs, _, _ = report.collect(tmp_path)
    names, counts, table = report.judge_per_class(next(r for r in runs if r.name == "standard"))
    assert names == ["disc", "star", "ring"] and counts == [2, 3, 1]
    assert table["inverter"] == pytest.approx([0.5, 2 / 3, 0.0])
    assert table["logit NN"] == [1.0, 1.0, 1.0] and "deepsim" not in table
    md = report.write_report(tmp_path)[0].read_text()
    assert "standard: judge agreement per class" in md and "| star | 3 | 0.667 | 1.000 |" in md
    # a run without per-image judge values gets no table
    assert "robust: judge agreement per class" not in md
