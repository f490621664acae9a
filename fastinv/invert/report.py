"""report.md + report.html for a run directory, from the metrics.json files in it.

Every sentence about the paper's findings is computed from the numbers found here; a finding
whose evidence is missing (one classifier only, no misclassified image, ...) is reported as
"not tested", never assumed. Expected layout (written by ``fastinv demo`` and
``fastinv invert``)::

    RUN_DIR/<classifier>/classifier.json      {"name", "robust", "val_accuracy", ...}
    RUN_DIR/<classifier>/analyses/<analysis>/metrics.json (+ PNGs)
    RUN_DIR/<classifier>/methods.json         inverter / deepsim / optimization metrics
    RUN_DIR/factors.json                      {classifier: {"real": {f: R²}, method: {...}}}
    RUN_DIR/summary.json                      optional: stage timings, settings
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastinv.invert.stats import Gate, Interval, Verdict, bootstrap_diff, verdict
from fastinv.io import atomic_write_text


@dataclass
class ClassifierRun:
    name: str
    path: Path
    info: dict = field(default_factory=dict)
    analyses: dict[str, dict] = field(default_factory=dict)
    methods: dict[str, dict] = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)  # per_image.json: per-image values by method

    @property
    def robust(self) -> bool | None:
        return self.info.get("robust")


def _num(v) -> float:
    if isinstance(v, str):
        return float(v) if v in ("inf", "-inf", "nan") else math.nan
    return float(v) if v is not None else math.nan


def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "–"
    v = float(v)
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.{digits}f}"


def _fmt_interval(d: dict | None) -> str:
    """An interval entry of factors.json as "+0.084 [-0.007, +0.168]"; "–" when missing."""
    return "–" if not d else str(Interval(**d))


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(run_dir: str | Path) -> tuple[list[ClassifierRun], dict, dict]:
    """Classifier runs under ``run_dir`` (any folder holding analyses/ or methods.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass the --out of "
                                "`fastinv demo` or of `fastinv invert`")
    roots = {p.parent for p in run_dir.rglob("methods.json")}
    roots |= {p.parent.parent.parent for p in run_dir.rglob("analyses/*/metrics.json")}
    runs = []
    for root in sorted(roots):
        name = root.relative_to(run_dir).as_posix()
        name = "classifier" if name == "." else name
        run = ClassifierRun(name, root, _read(root / "classifier.json"))
        for m in sorted((root / "analyses").glob("*/metrics.json")):
            run.analyses[m.parent.name] = _read(m)
        run.methods = _read(root / "methods.json")
        run.per_image = _read(root / "per_image.json")
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"{run_dir} holds no analyses/*/metrics.json or methods.json; "
                                "run `fastinv demo` or `fastinv invert` into it first")
    return runs, _read(run_dir / "factors.json"), _read(run_dir / "summary.json")


# ---- findings -------------------------------------------------------------------------------
# A finding is "reproduced" only when its paired bootstrap 95% interval over images excludes 0
# in the paper's direction AND these quality gates hold; "contradicted" when it excludes 0 the
# other way (gates holding); otherwise "inconclusive", with the reason.
CLASSIFIER_GATE = 0.90  # Φ's validation accuracy (clean, for the robust one too)
JUDGE_GATE = 0.50  # the inverter's judge agreement: judge(x̂) = true label (chance 1 / classes)
MIN_MISCLASSIFIED = 5  # misclassified held-out images needed to test that finding
# The noise finding compares how much the noise moves each inverter's output; an inverter whose
# draws are one picture whatever the noise (mode collapse: per-pixel std 0.03-0.04 on images in
# [-1, 1] in the demo of 2026-12-05, its six draws per image identical to the eye) says nothing
# of what the logits pin down, so the inverter must use its noise at least this much.
NOISE_GATE = 0.05


def _inverter(run: ClassifierRun, key: str) -> float:
    if "inverter" in run.methods and key in run.methods["inverter"]:
        return _num(run.methods["inverter"][key])
    return _num(run.analyses.get("reconstruct", {}).get(key))


def _gates(run: ClassifierRun) -> list[Gate]:
    return [Gate(f"{run.name} Φ val acc", _num(run.info.get("val_accuracy")), CLASSIFIER_GATE),
            Gate(f"{run.name} inverter judge agreement", _inverter(run, "judge_vs_label"),
                 JUDGE_GATE)]


def _paired(a: ClassifierRun, b: ClassifierRun, get) -> tuple[list[float], list[float]] | None:
    """Per-image values of ``a`` and ``b`` on the images both evaluated (by dataset row)."""
    va, vb = get(a), get(b)
    if va is None or vb is None:
        return None
    common = sorted(set(va) & set(vb))
    return ([va[i] for i in common], [vb[i] for i in common]) if len(common) >= 2 else None


def _inverter_per_image(key: str):
    def get(run: ClassifierRun):
        m = run.per_image.get("methods", {}).get("inverter", {})
        if key not in m:
            return None
        return dict(zip(run.per_image["index"], m[key]))
    return get


def _noise_per_image(run: ClassifierRun):
    r = run.analyses.get("resample", {})
    if "noise_std_per_image" not in r:
        return None
    index = r.get("index") or list(range(len(r["noise_std_per_image"])))
    return dict(zip(index, r["noise_std_per_image"]))


def _row(claim: str, v: Verdict, evidence: str) -> tuple[str, str, str]:
    return claim, v.outcome, f"{evidence}. {v.reason}"


def findings(runs: list[ClassifierRun], factors: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each of the paper's findings checked here."""
    out = []
    robust = [r for r in runs if r.robust is True]
    standard = [r for r in runs if r.robust is False]
    pair = (robust[0], standard[0]) if robust and standard else None

    claim = "Robust classifiers' logits give closer reconstructions"
    values = _paired(*pair, _inverter_per_image("psnr")) if pair else None
    if values:
        r, s = pair
        iv = bootstrap_diff(*values)
        v = verdict(iv, +1, _gates(r) + _gates(s))
        out.append(_row(claim, v, f"inverter PSNR, {r.name} − {s.name}, paired over {iv.n} "
                                  f"images: {iv} dB"))
    else:
        out.append((claim, "not tested", "needs per-image inverter results for one standard "
                                         "and one robust classifier"))

    claim = "Noise changes non-robust reconstructions more (logits of robust models pin down more)"
    values = _paired(*pair, _noise_per_image) if pair else None
    if values:
        r, s = pair
        iv = bootstrap_diff(values[1], values[0])
        noise = [Gate(f"{run.name} inverter noise std",
                      _num(run.analyses.get("resample", {}).get("noise_std")), NOISE_GATE)
                 for run in pair]
        v = verdict(iv, +1, _gates(r) + _gates(s) + noise)
        seeking = [run.name for run in pair
                   if (run.info.get("inverter_options") or {}).get("mode seeking")]
        if seeking and v.outcome != "inconclusive":
            # mode seeking pays G for outputs that move with its noise, so how much the noise
            # moves them measures that loss term as much as what the logits pin down
            who = " and ".join(seeking) + (" inverters were" if len(seeking) > 1 else
                                           " inverter was")
            v = Verdict("inconclusive", f"the {who} trained with mode seeking, which rewards "
                        "outputs that vary with the noise: this difference cannot separate that "
                        "from what the logits pin down", iv, v.gates)
        out.append(_row(claim, v, f"per-pixel std over noise draws, {s.name} − {r.name}, paired "
                                  f"over {iv.n} images: {iv}"))
    else:
        out.append((claim, "not tested", "needs per-image resample results for a standard and "
                                         "a robust classifier"))

    for r in runs:
        claim = f"Misclassified images still reconstruct the original image ({r.name})"
        m = r.analyses.get("misclassified", {})
        own, other = m.get("psnr_per_image"), m.get("psnr_vs_other_per_image")
        n = int(m.get("n_misclassified") or 0)
        if not own or not other:
            out.append((claim, "not tested", "no misclassified held-out image"
                        if not n else "no per-image PSNR in misclassified/metrics.json"))
            continue
        iv = bootstrap_diff(own, other) if n >= 2 else None
        gates = _gates(r) + [Gate(f"{r.name} misclassified images", n, MIN_MISCLASSIFIED)]
        v = verdict(iv, +1, gates)
        k = int(m.get("n_other_images") or 1)  # runs from before it: one other image each
        ref = "to another held-out image" if k == 1 else f"its mean to {k} other held-out images"
        out.append(_row(claim, v, f"{n} misclassified held-out image{'' if n == 1 else 's'} of "
                                  f"{int(m.get('n_images') or 0)}: PSNR of x̂ to its own x minus "
                                  f"{ref}: {iv if iv else '–'} dB"))

    for clf, table in factors.items():
        claim = (f"Logits keep more than the class: nuisance factors can be read off "
                 f"reconstructions ({clf})")
        intervals = table.get("_intervals", {}).get("inverter")
        run = next((r for r in runs if r.name == clf), None)
        if not intervals or run is None:
            out.append((claim, "not tested", "no factor intervals (needs the synthetic "
                                             "dataset's factors.csv)"))
            continue
        ivs = {f: Interval(**d) for f, d in intervals.items()}
        kept = sorted(f for f, iv in ivs.items() if iv.lo > 0)
        # the correlation of x̂'s factor with x's within Φ's class (Bonferroni-level intervals):
        # a factor drawn weakly has R² below 0 and this r above 0
        within = {f: Interval(**d) for f, d in
                  table.get("_within_r", {}).get("inverter", {}).items()}
        follows = sorted(f for f, iv in within.items() if iv.lo > 0)
        failed = [g for g in _gates(run) if not g.holds]
        if failed:
            outcome, reason = "inconclusive", "quality gate not met: " + "; ".join(map(str, failed))
        elif kept or follows:
            outcome, reason = "reproduced", "; ".join(
                ([f"R² interval above 0 for {', '.join(kept)}"] if kept else [])
                + (["x̂ follows x within Φ's class for " + ", ".join(
                    f"{f} (r {within[f]}, {within[f].level:.1%} interval)" for f in follows)]
                   if follows else []))
        elif carried := _carried_by_logits(table):
            # what reads the logits directly (the training image nearest in logit space, the
            # per-class linear probe) finds these factors: the logits carry them and this
            # inverter does not draw them, which says nothing against the paper
            drawn = "; ".join(f"{f} r {within[f]}" for f, _ in carried if f in within)
            outcome, reason = "inconclusive", ("the logits carry " + "; ".join(
                f"{f} ({', '.join(f'{m} R² {iv}' for m, iv in by)})" for f, by in carried)
                + ": the inverter does not draw them" + (
                    f" (within Φ's class x̂ does not follow x: {drawn})" if drawn else ""))
        else:
            # never "contradicted": an R² interval below 0 says the regressor cannot read the
            # factor off x̂ as well as a constant guess, not that x̂ holds nothing of it (a
            # factor that follows x's weakly and varies as much as the data's scores below 0),
            # and a probe that reads nothing off the logits is no proof they lack it
            outcome, reason = "inconclusive", ("no factor's R² interval lies above 0, on the "
                                               "inverter's outputs or read off the logits")
        ev = "; ".join(f"{f} {iv}" for f, iv in sorted(ivs.items()))
        out.append((claim, outcome, f"R² of the factor regressor on inverter outputs (95% "
                                    f"bootstrap over images): {ev}. {reason}"))
    return out


def _carried_by_logits(table: dict) -> list[tuple[str, list[tuple[str, Interval]]]]:
    """Factors some direct reading of the logits (logit NN, logit probe) finds with an R²
    interval above 0: [(factor, [(reader, interval), ...]), ...], sorted by factor."""
    found: dict[str, list] = {}
    for reader in ("logit NN", "logit probe"):
        for f, d in table.get("_intervals", {}).get(reader, {}).items():
            if (iv := Interval(**d)).lo > 0:
                found.setdefault(f, []).append((reader, iv))
    return sorted(found.items())


def _sidecar_classes(run: ClassifierRun) -> list[str]:
    """Class names from the classifier's weights sidecar (runs from before per_image.json
    kept them)."""
    from fastinv.models.classifiers import sidecar_path

    weights = run.info.get("weights")
    try:
        return list(json.loads(sidecar_path(weights).read_text()).get("classes") or []) \
            if weights else []
    except (OSError, ValueError):
        return []


def judge_per_class(run: ClassifierRun) -> tuple[list[str], list[int], dict[str, list[float]]]:
    """Per true class: the class names, the image counts, and each method's judge agreement
    (judge(x̂) = x's class), from per_image.json. Empty when the run has no per-image judge
    values. Which classes an inverter draws recognisably is where a mean hides most."""
    pi = run.per_image
    labels = pi.get("labels")
    methods = {m: v["judge_vs_label"] for m, v in pi.get("methods", {}).items()
               if "judge_vs_label" in v and labels and len(v["judge_vs_label"]) == len(labels)}
    if not methods:
        return [], [], {}
    k = max(labels) + 1
    names = list(pi.get("class_names") or _sidecar_classes(run))
    names = names[:k] if len(names) >= k else [f"class {c}" for c in range(k)]
    counts = np.bincount(labels, minlength=k)
    with np.errstate(invalid="ignore"):  # a class with no image: nan
        table = {m: (np.bincount(labels, weights=v, minlength=k) / counts).tolist()
                 for m, v in methods.items()}
    return names, counts.tolist(), table


def weak_classifiers(runs: list[ClassifierRun]) -> list[str]:
    """Classifiers whose validation accuracy is below twice chance, said in words."""
    out = []
    for r in runs:
        acc = r.info.get("val_accuracy")
        n = r.info.get("num_classes")
        if acc is None or not n:
            continue
        if acc < 2.0 / n:
            out.append(f"{r.name} reaches {acc:.1%} validation accuracy on {n} classes "
                       f"(chance {1 / n:.1%})")
    return out


# ---- document model: blocks rendered to Markdown and HTML ----------------------------------

METHOD_KEYS = (("judge_vs_label", "judge: x̂ is x's class"), ("judge_vs_judge", "judge(x̂) = judge(x)"),
               ("kid", "KID (judge features)"), ("top1_vs_orig", "Φ(x̂) = Φ(x) top-1"),
               ("logit_cosine", "logit cos"), ("psnr", "PSNR dB"), ("ssim", "SSIM"),
               ("seconds_per_image", "s / image"))
FIGURES = (("reconstruct", "reconstruct.png", "original | reconstructions (two noise draws)"),
           ("resample", "resample.png", "original | reconstructions with fresh noise"),
           ("resample", "resample_std.png", "per-pixel std over noise: what the logits leave free"),
           ("misclassified", "misclassified.png", "misclassified images and their reconstructions"),
           ("shift", "shift_curves.png", "logits + c"), ("shift", "shift.png", "logits + c, grid"),
           ("scale", "scale_curves.png", "logits × s"), ("scale", "scale.png", "logits × s, grid"),
           ("perturb", "perturb_curves.png", "logits + N(0, σ²)"),
           ("perturb", "perturb.png", "logits + N(0, σ²), grid"))


def build_blocks(run_dir: Path) -> list[tuple]:
    runs, factors, summary = collect(run_dir)
    b: list[tuple] = [("h", 1, "fastinv report"),
                      ("p", f"Run directory: `{run_dir}`. Every number below is read from the "
                            "metrics.json files in it.")]
    if summary:
        b.append(("h", 2, "Run"))
        rows = [[k, _fmt(v, 1) if isinstance(v, float) else str(v)]
                for k, v in summary.items() if not isinstance(v, dict | list)]
        b.append(("table", ["item", "value"], rows))
        if isinstance(summary.get("stage_seconds"), dict):
            cpu = summary.get("stage_cpu_seconds", {})
            rows = [[k, _fmt(v, 1), _fmt(cpu.get(k), 1)] for k, v in summary["stage_seconds"].items()]
            b.append(("table", ["stage", "wall s", "CPU s (this process)"], rows))

    b.append(("h", 2, "The paper's findings on this data"))
    rows = [[c, v, e] for c, v, e in findings(runs, factors)]
    b.append(("table", ["finding (Teterwak et al. 2021)", "verdict", "evidence"], rows))
    b.append(("p", "A finding is *reproduced* only when its paired bootstrap 95% interval over "
                   "held-out images excludes 0 in the paper's direction and the quality gates "
                   f"hold: Φ's validation accuracy ≥ {CLASSIFIER_GATE:.0%} and the inverter's "
                   f"judge agreement (judge(x̂) = x's class) ≥ {JUDGE_GATE:.0%} for every "
                   "classifier the finding compares (and ≥ "
                   f"{MIN_MISCLASSIFIED} misclassified images for that finding); *contradicted* "
                   "when it excludes 0 the other way; otherwise *inconclusive*, with the reason."))
    options = {r.name: r.info.get("inverter_options") for r in runs if "inverter_options" in r.info}
    if options:
        text = "; ".join(f"{n}: " + (", ".join(f"{k} ({v})" for k, v in o.items()) or
                                     "none (the paper's GAN-only recipe)")
                         for n, o in options.items())
        b.append(("p", "Inverter options beyond the paper's GAN-only recipe used by this run — "
                       + text + ". `benchmarks/bench_quality.py` measures each option's effect."))
    weak = weak_classifiers(runs)
    if weak:
        b.append(("p", "Caution: " + "; ".join(weak) + ". The paper's findings are about "
                  "trained classifiers; verdicts on these are not evidence either way. Train the "
                  "classifiers longer or on more images (`fastinv classifier`, or the demo's "
                  "`gpu` preset on a GPU)."))

    b.append(("h", 2, "Classifiers"))
    rows = [[r.name, f"{r.info.get('arch', '?')} (width {r.info.get('width', '?')}, "
             f"{r.info.get('blocks', '?')} per stage)", {True: "yes", False: "no"}.get(r.robust, "?"),
             _fmt(r.info.get("val_accuracy")), _fmt(r.info.get("val_robust_accuracy"))]
            for r in runs]
    judges = {json.dumps(r.info["judge"], sort_keys=True) for r in runs if "judge" in r.info}
    for j in sorted(judges):
        j = json.loads(j)
        arch = f"{j.get('arch', '?')} (width {j.get('width', '?')}, {j.get('blocks', '?')} per stage)"
        rows.append([f"judge (seed {j.get('seed')}, evaluation only)", arch, "no",
                     _fmt(j.get("val_accuracy")), "–"])
    b.append(("table", ["classifier", "architecture", "robust", "val acc", "val acc under PGD"],
              rows))

    b.append(("h", 2, "Methods on the same images"))
    b.append(("p", "Inverter = the logit-conditioned GAN inverter, one noise draw per image (the "
                   "paper; the findings are tested on it); `inverter, best of k` = the same "
                   "inverter with Φ-consistent sampling, an option beyond the paper: k noise "
                   "draws per image, the one whose Φ logits are closest to the input logits "
                   "(KL of the softmaxes) kept — it uses the logits and Φ only, never the "
                   "original or the judge; DeePSiM = feedforward decoder "
                   "with pixel + feature + adversarial losses; logit NN = the training image whose "
                   "logits are nearest (what the logits pin down within the data, no training); "
                   "optimization = gradient descent on x (TV/L2 prior, restarts), on a subset — "
                   "the `_opt_subset` rows score the feedforward methods on that same subset. "
                   "The judge is a classifier of another architecture and seed trained only on "
                   "real images (the `real images` row is its accuracy on the originals: the "
                   "ceiling); KID is measured in its feature space against the real held-out "
                   "images (lower is more realistic; an unbiased estimate, in the judge's feature "
                   "units, so it can fall below 0 when two sets are alike, most often on the "
                   "small `_opt_subset`). Noise std is the inverter's mean per-pixel "
                   "std over noise draws (the other methods are deterministic)."))
    header = ["classifier", "method"] + [h for _, h in METHOD_KEYS] + ["noise std"]
    rows = []
    for r in runs:
        methods = r.methods or ({"inverter": r.analyses["reconstruct"]}
                                if "reconstruct" in r.analyses else {})
        for name, m in methods.items():
            noise = r.analyses.get("resample", {}).get("noise_std") if name == "inverter" else None
            rows.append([r.name, name] + [_fmt(m.get(k), 2 if k == "psnr" else 3) for k, _ in METHOD_KEYS]
                        + [_fmt(noise, 4)])
    b.append(("table", header, rows))
    for r in runs:
        names, counts, table = judge_per_class(r)
        if not table:
            continue
        b.append(("h", 3, f"{r.name}: judge agreement per class"))
        rows = [[name, str(n)] + [_fmt(table[m][c]) for m in table]
                for c, (name, n) in enumerate(zip(names, counts))]
        b.append(("table", ["class", "images"] + list(table), rows))
    extra = [(r.name, n, m) for r in runs for n, m in r.methods.items()
             if any(k in m for k in ("lpips", "fid"))]
    lp = "; ".join(f"{c}/{n}: LPIPS {_fmt(m.get('lpips'))}, FID {_fmt(m.get('fid'))}"
                   for c, n, m in extra)
    b.append(("p", "LPIPS / FID: " + (lp or "not computed (they need local backbone weight "
                                            "files: --lpips-alexnet, --fid-inception)") + "."))

    if factors:
        b.append(("h", 2, "Factor retention (R² per factor)"))
        b.append(("p", "A CNN trained on real images predicts each nuisance factor; `real` is its "
                       "R² on held-out real images (the ceiling), the other columns its R² on each "
                       "method's reconstructions against the originals' factors. `logit probe` "
                       "reads the factors off Φ's logits alone, with no image in between (one "
                       "least-squares map of the logits per Φ class, fit on the training images): "
                       "what the logits carry for an inverter to draw."))
        cols = [(c, m) for c, t in factors.items() for m in t if not m.startswith("_")]
        # factor names from the method columns only: "_intervals" is keyed by method
        names = sorted({f for c, m in cols for f in factors[c][m]})
        rows = [[f] + [_fmt(factors[c][m].get(f)) for c, m in cols] for f in names]
        b.append(("table", ["factor"] + [f"{c}/{m}" for c, m in cols], rows))
        wcols = [(c, m) for c, t in factors.items() for m in t.get("_within_r", {})]
        if wcols:
            level = next(iter(factors[wcols[0][0]]["_within_r"][wcols[0][1]].values()))["level"]
            b.append(("h", 3, "Does x̂ follow x beyond the class? (within-class r)"))
            b.append(("p", "The correlation of the regressor's reading of each reconstruction "
                           "with the original's factor, both centred on the mean of Φ's class: "
                           "above 0 when x̂ draws what the logits carry beyond the class, even "
                           "weakly (an x̂ sampled from what the logits leave open has R² = "
                           f"2r − 1, below 0 for r < 0.5). {level:.1%} bootstrap intervals "
                           "over images (Bonferroni: 95% over all factors together)."))
            rows = [[f] + [_fmt_interval(factors[c]["_within_r"][m].get(f)) for c, m in wcols]
                    for f in names]
            b.append(("table", ["factor"] + [f"{c}/{m}" for c, m in wcols], rows))

    b.append(("h", 2, "Logit manipulation"))
    for r in runs:
        for kind in ("shift", "scale", "perturb"):
            m = r.analyses.get(kind)
            if not m:
                continue
            rows = [[_fmt(e["value"], 2), _fmt(e["top1_vs_orig"]), _fmt(e["logit_cosine"]),
                     _fmt(e["psnr"], 2), _fmt(e["ssim"])] for e in m["per_value"]]
            b.append(("h", 3, f"{r.name}: {kind}"))
            b.append(("table", ["value", "top-1 agree", "logit cos", "PSNR dB", "SSIM"], rows))

    b.append(("h", 2, "Figures"))
    for r in runs:
        b.append(("h", 3, r.name))
        if (r.path / "methods.png").is_file():
            b.append(("img", (r.path / "methods.png").relative_to(run_dir).as_posix(),
                      f"{r.name}: original | each method's reconstruction, captioned with the "
                      "judge's label (✓: the original's true class)"))
        if (r.path / "factors.png").is_file():
            b.append(("img", (r.path / "factors.png").relative_to(run_dir).as_posix(),
                      f"{r.name}: what the logits carry beyond the class (the factor the logit "
                      "NN follows most surely within Φ's classes): originals sorted by it above their "
                      "reconstructions, and x̂'s reading against x's, centred on the class"))
        for analysis, fname, caption in FIGURES:
            p = r.path / "analyses" / analysis / fname
            if p.is_file():
                b.append(("img", p.relative_to(run_dir).as_posix(), f"{r.name}: {caption}"))
    return b


def _md(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        if blk[0] == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif blk[0] == "p":
            out.append(blk[1])
        elif blk[0] == "table":
            header, rows = blk[1], blk[2]
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        elif blk[0] == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        out.append("")
    return "\n".join(out)


def _html(blocks: list[tuple]) -> str:
    esc = html.escape
    body = []
    for blk in blocks:
        if blk[0] == "h":
            body.append(f"<h{blk[1]}>{esc(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            body.append(f"<p>{esc(blk[1]).replace('`', '')}</p>")
        elif blk[0] == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in blk[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                           for row in blk[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif blk[0] == "img":
            body.append(f'<figure><img src="{esc(blk[1])}" alt="{esc(blk[2])}">'
                        f"<figcaption>{esc(blk[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}"
             "figcaption{font-size:12px;color:#555}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fastinv report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    blocks = build_blocks(run_dir)
    md, htm = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md, _md(blocks))
    atomic_write_text(htm, _html(blocks))
    return md, htm
