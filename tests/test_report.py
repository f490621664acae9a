"""The report renders from a run directory, and its verdicts follow the numbers."""

import json

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


def _fake_run(root, robust_psnr, standard_psnr, robust_std, standard_std, mis_psnr=20.0):
    for name, robust, psnr, std in (("robust", True, robust_psnr, robust_std),
                                    ("standard", False, standard_psnr, standard_std)):
        _write(root / name / "classifier.json", {"name": name, "robust": robust, "val_accuracy": 0.9})
        _write(root / name / "analyses" / "reconstruct" / "metrics.json", {"psnr": psnr, "ssim": psnr / 100})
        _write(root / name / "analyses" / "resample" / "metrics.json", {"noise_std": std})
        _write(root / name / "analyses" / "misclassified" / "metrics.json",
               {"n_misclassified": 3, "psnr": mis_psnr, "psnr_vs_other_images": 12.0,
                "correct_psnr": 21.0})
    _write(root / "factors.json", {"standard": {"real": {"x": 0.9}, "inverter": {"x": 0.7, "y": 0.1}}})


def _verdicts(root):
    runs, factors, _ = report.collect(root)
    return {claim.split()[0]: verdict for claim, verdict, _ in report.findings(runs, factors)}


def test_verdicts_follow_the_numbers(tmp_path):
    _fake_run(tmp_path / "a", robust_psnr=20, standard_psnr=15, robust_std=0.01, standard_std=0.05)
    v = _verdicts(tmp_path / "a")
    assert v == {"Robust": "reproduced", "Noise": "reproduced", "Misclassified": "reproduced",
                 "Logits": "reproduced"}
    _fake_run(tmp_path / "b", robust_psnr=15, standard_psnr=20, robust_std=0.05, standard_std=0.01,
              mis_psnr=12.5)
    v = _verdicts(tmp_path / "b")
    assert v["Robust"] == "not reproduced" and v["Noise"] == "not reproduced"
    assert v["Misclassified"] == "not reproduced"


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
    _fake_run(tmp_path, robust_psnr=20, standard_psnr=15, robust_std=0.01, standard_std=0.05)
    _write(tmp_path / "robust" / "classifier.json",
           {"name": "robust", "robust": True, "val_accuracy": 0.3, "num_classes": 4})
    runs, _, _ = report.collect(tmp_path)
    assert report.weak_classifiers(runs) == [
        "robust reaches 30.0% validation accuracy on 4 classes (chance 25.0%)"]
    md, _ = report.write_report(tmp_path)
    assert "Caution: robust reaches 30.0%" in md.read_text()
