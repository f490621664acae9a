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

from fastinv.io import atomic_write_text

MARGIN_DB = 1.0  # PSNR gap that counts as "clearly above chance" for misclassified images
RETAINED_R2 = 0.5  # a factor counts as retained by the logits at R² >= this on reconstructions


@dataclass
class ClassifierRun:
    name: str
    path: Path
    info: dict = field(default_factory=dict)
    analyses: dict[str, dict] = field(default_factory=dict)
    methods: dict[str, dict] = field(default_factory=dict)

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
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"{run_dir} holds no analyses/*/metrics.json or methods.json; "
                                "run `fastinv demo` or `fastinv invert` into it first")
    return runs, _read(run_dir / "factors.json"), _read(run_dir / "summary.json")


# ---- findings -------------------------------------------------------------------------------


def _inverter(run: ClassifierRun, key: str) -> float:
    if "inverter" in run.methods and key in run.methods["inverter"]:
        return _num(run.methods["inverter"][key])
    return _num(run.analyses.get("reconstruct", {}).get(key))


def findings(runs: list[ClassifierRun], factors: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each of the paper's findings checked here."""
    out = []
    robust = [r for r in runs if r.robust is True]
    standard = [r for r in runs if r.robust is False]

    claim = "Robust classifiers' logits give closer reconstructions"
    if robust and standard:
        r, s = robust[0], standard[0]
        better = [k for k in ("psnr", "ssim") if _inverter(r, k) > _inverter(s, k)]
        verdict = {2: "reproduced", 1: "partly reproduced", 0: "not reproduced"}[len(better)]
        ev = (f"inverter PSNR {_fmt(_inverter(r, 'psnr'), 2)} dB ({r.name}) vs "
              f"{_fmt(_inverter(s, 'psnr'), 2)} dB ({s.name}); SSIM {_fmt(_inverter(r, 'ssim'))} "
              f"vs {_fmt(_inverter(s, 'ssim'))}")
    else:
        verdict, ev = "not tested", "needs one standard and one robust classifier in the run"
    out.append((claim, verdict, ev))

    claim = "Noise changes non-robust reconstructions more (logits of robust models pin down more)"
    rs = [_num(r.analyses.get("resample", {}).get("noise_std")) for r in robust[:1]]
    ss = [_num(s.analyses.get("resample", {}).get("noise_std")) for s in standard[:1]]
    if rs and ss and not (math.isnan(rs[0]) or math.isnan(ss[0])):
        verdict = "reproduced" if ss[0] > rs[0] else "not reproduced"
        ev = (f"mean per-pixel std over noise draws {_fmt(ss[0], 4)} ({standard[0].name}) vs "
              f"{_fmt(rs[0], 4)} ({robust[0].name})")
    else:
        verdict, ev = "not tested", "needs resample results for a standard and a robust classifier"
    out.append((claim, verdict, ev))

    claim = "Misclassified images still reconstruct the original image"
    parts, verdicts = [], []
    for r in runs:
        m = r.analyses.get("misclassified", {})
        if not m.get("n_misclassified"):
            continue
        own, other = _num(m.get("psnr")), _num(m.get("psnr_vs_other_images"))
        verdicts.append(own > other + MARGIN_DB)
        parts.append(f"{r.name}: {m['n_misclassified']} images, PSNR to own original "
                     f"{_fmt(own, 2)} dB vs {_fmt(other, 2)} dB to other images "
                     f"(correctly classified: {_fmt(m.get('correct_psnr'), 2)} dB)")
    if verdicts:
        verdict = ("reproduced" if all(verdicts) else
                   "partly reproduced" if any(verdicts) else "not reproduced")
        ev = "; ".join(parts) + f" (criterion: at least {MARGIN_DB:g} dB above other images)"
    else:
        verdict, ev = "not tested", "no classifier got any evaluated image wrong"
    out.append((claim, verdict, ev))

    claim = "Logits keep more than the class (nuisance factors can be read off reconstructions)"
    kept = {}
    for clf, table in factors.items():
        inv = table.get("inverter", {})
        kept[clf] = sorted(f for f, v in inv.items() if _num(v) >= RETAINED_R2)
    if kept:
        verdict = "reproduced" if any(kept.values()) else "not reproduced"
        ev = "; ".join(f"{c}: {', '.join(v) if v else 'none'}" for c, v in kept.items())
        ev = f"factors with R² ≥ {RETAINED_R2:g} on inverter reconstructions — {ev}"
    else:
        verdict, ev = "not tested", "no factor table (needs the synthetic dataset's factors.csv)"
    out.append((claim, verdict, ev))
    return out


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

METHOD_KEYS = (("top1_vs_orig", "top-1 agree Φ(x)"), ("top1_vs_label", "top-1 vs label"),
               ("top5_vs_label", "top-5 vs label"), ("logit_cosine", "logit cos"),
               ("logit_rel_l2", "logit rel L2"), ("psnr", "PSNR dB"), ("ssim", "SSIM"),
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
    weak = weak_classifiers(runs)
    if weak:
        b.append(("p", "Caution: " + "; ".join(weak) + ". The paper's findings are about "
                  "trained classifiers; verdicts on these are not evidence either way. Train the "
                  "classifiers longer or on more images (`fastinv classifier`, or the demo's "
                  "`gpu` preset on a GPU)."))

    b.append(("h", 2, "Classifiers"))
    rows = [[r.name, {True: "yes", False: "no"}.get(r.robust, "?"),
             _fmt(r.info.get("val_accuracy")), _fmt(r.info.get("val_robust_accuracy"))]
            for r in runs]
    b.append(("table", ["classifier", "robust", "val acc", "val acc under PGD"], rows))

    b.append(("h", 2, "Methods on the same images"))
    b.append(("p", "Inverter = the logit-conditioned GAN inverter; DeePSiM = feedforward decoder "
                   "with pixel + feature + adversarial losses; optimization = gradient descent on "
                   "x (TV/L2 prior, restarts), on a subset — the `_opt_subset` rows score the "
                   "feedforward methods on that same subset. Noise std is the inverter's mean "
                   "per-pixel std over noise draws (the decoders are deterministic)."))
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
                       "method's reconstructions against the originals' factors."))
        cols = [(c, m) for c, t in factors.items() for m in t]
        names = sorted({f for t in factors.values() for d in t.values() for f in d})
        rows = [[f] + [_fmt(factors[c][m].get(f)) for c, m in cols] for f in names]
        b.append(("table", ["factor"] + [f"{c}/{m}" for c, m in cols], rows))

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
