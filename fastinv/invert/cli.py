"""``fastinv invert ANALYSIS``: run analyses of a trained inverter on a folder of images.

    fastinv invert all --inverter runs/demo/standard/inverter --data runs/demo/data/val \
        --out runs/my-analysis

ANALYSIS is one of reconstruct, resample, misclassified, shift, scale, perturb, compare
(inverter vs optimization-based inversion on the same images) or all. The classifier defaults
to the one the inverter was trained on (its config); ``--classifier``/``--weights`` override.
Results go to ``OUT/analyses/<analysis>/`` (+ ``OUT/methods.json`` for compare), which
``fastinv report OUT`` turns into report.md / report.html.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastinv.invert.evaluate import ANALYSES

CHOICES = (*ANALYSES, "compare", "all")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("analysis", choices=CHOICES)
    parser.add_argument("--inverter", required=True,
                        help="inverter run directory or checkpoint (from `fastinv train`)")
    parser.add_argument("--data", required=True, help="ImageFolder of images to invert")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classifier", default=None,
                        help="classifier spec (default: the inverter's, from its config)")
    parser.add_argument("--weights", default=None, help="classifier weights (local file)")
    parser.add_argument("--robust", choices=["yes", "no"], default=None,
                        help="tag the classifier as robust or not (used by the report)")
    parser.add_argument("--n", type=int, default=256, help="images to use (default 256)")
    parser.add_argument("--k", type=int, default=8, help="noise draws for resample (default 8)")
    parser.add_argument("--values", default=None,
                        help="comma-separated sweep values for shift/scale/perturb")
    parser.add_argument("--opt-steps", type=int, default=200)
    parser.add_argument("--opt-restarts", type=int, default=3)
    parser.add_argument("--opt-n", type=int, default=32, help="images for optimization (compare)")
    parser.add_argument("--best-of", type=int, default=16, metavar="K",
                        help="compare: also score the inverter with Φ-consistent sampling, K noise "
                             "draws per image and the one Φ reads closest to the logits kept "
                             "(fastinv.invert.selection; default 16, 1 = off)")
    parser.add_argument("--lpips-alexnet", default=None,
                        help="torchvision alexnet state dict for LPIPS (compare); never downloaded")
    parser.add_argument("--fid-inception", default=None,
                        help="torchvision inception_v3 state dict for FID (compare)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import json

    from fastinv.data import dataset_classes, make_loader
    from fastinv.invert.analyses import collect_images
    from fastinv.invert.baselines import OptimizationConfig
    from fastinv.invert.evaluate import compare_methods, run_analyses, write_classifier_info
    from fastinv.invert.metrics import json_safe, optional_perceptual_metrics
    from fastinv.io import atomic_write_text
    from fastinv.models.classifiers import load_classifier
    from fastinv.train.checkpoint import load_inverter
    from fastinv.train.distributed import resolve_device

    if args.best_of < 1:
        from fastinv.train.config import ConfigError

        raise ConfigError(f"--best-of must be >= 1 (1 = off), got {args.best_of}")
    device = resolve_device(args.device).type
    G, cfg = load_inverter(args.inverter, device=device)
    spec = args.classifier or cfg.classifier.spec
    weights = args.weights if (args.classifier or args.weights) else cfg.classifier.weights
    random_init = cfg.classifier.random_init and not (args.classifier or args.weights)
    clf = load_classifier(spec, weights=weights, random_init=random_init,
                          num_classes=cfg.classifier.num_classes).place(device)
    data_dir = Path(args.data)
    loader = make_loader(data_dir, resolution=G.resolution, classifier_size=clf.input_size,
                         classifier_mean=clf.mean, classifier_std=clf.std, batch_size=64,
                         train=False, device=device)
    data = collect_images(loader, clf, args.n, device, dataset_size=len(loader.source.paths),
                          seed=args.seed)
    out = Path(args.out)
    info = {"name": spec, "weights": weights, "inverter": str(args.inverter)}
    if args.robust is not None:
        info["robust"] = args.robust == "yes"
    write_classifier_info(out, info)

    which = ANALYSES if args.analysis == "all" else (
        () if args.analysis == "compare" else (args.analysis,))
    sweeps = {}
    if args.values and args.analysis in ("shift", "scale", "perturb"):
        sweeps[args.analysis] = [float(v) for v in args.values.split(",")]
    classes = dataset_classes(data_dir) if data_dir.is_dir() else None
    results = run_analyses(G, clf, data, out / "analyses", which=which, class_names=classes,
                           k=args.k, sweeps=sweeps, seed=args.seed, progress=True)
    if args.analysis in ("compare", "all"):
        ocfg = OptimizationConfig(steps=args.opt_steps, restarts=args.opt_restarts, seed=args.seed)
        from fastinv.invert.selection import inverter_methods

        methods, recs = compare_methods(clf, data, inverter_methods(G, clf, args.best_of),
                                        out / "methods.json",
                                        optimization=ocfg, n_optimization=args.opt_n,
                                        seed=args.seed)
        if args.lpips_alexnet or args.fid_inception:
            methods["inverter"].update(optional_perceptual_metrics(
                recs["inverter"], data.images, args.lpips_alexnet, args.fid_inception))
            atomic_write_text(out / "methods.json", json.dumps(json_safe(methods), indent=2))
        results["compare"] = methods
    for name, m in results.items():
        shown = {k: v for k, v in m.items() if isinstance(v, float | int) and not isinstance(v, bool)}
        if name == "compare":
            shown = {meth: round(mm["psnr"], 2) for meth, mm in m.items()}
        sys.stdout.write(f"{name}: {json.dumps(json_safe(shown))}\n")
    sys.stdout.write(f"wrote {out}; render the report with `fastinv report {out}`\n")
    return 0
