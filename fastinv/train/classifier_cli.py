"""``fastinv classifier``: train the small standard / PGD-robust classifier, inspect any spec.

    fastinv classifier train --data=DIR --out=clf.safetensors [--adversarial=l2 --eps=0.5]
    fastinv classifier show fastinv:small_resnet --weights clf.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="classifier_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train the small ResNet (standard or PGD adversarial)")
    train.add_argument("overrides", nargs=argparse.REMAINDER,
                       help="--key=value per ClassifierConfig field (the syntax of fastinv "
                            "train's overrides); --print-config shows every key")
    show = sub.add_parser("show", help="load a classifier spec and print what it is")
    show.add_argument("spec", help="torchvision:<name>, timm:<name>, robust:<arch>, "
                      "torchscript:<path>, fastinv:small_resnet")
    show.add_argument("--weights", default=None, help="local weights file")
    show.add_argument("--random-init", action="store_true", help="no weights (tests)")
    show.add_argument("--num-classes", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        sys.stderr.write(f"fastinv classifier: {exc}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.classifier_command == "train":
        from fastinv.models.classifiers import sidecar_path
        from fastinv.train.classifier import ClassifierConfig, train_classifier
        from fastinv.train.config import apply_field_overrides

        cfg = ClassifierConfig()
        overrides = [o for o in args.overrides if o != "--print-config"]
        apply_field_overrides(cfg, overrides)
        if len(overrides) < len(args.overrides):
            print(json.dumps(dataclasses.asdict(cfg), indent=1))
            return 0
        path = train_classifier(cfg)
        meta = json.loads(sidecar_path(path).read_text())
        acc = {k: meta[k] for k in ("val_accuracy", "val_robust_accuracy") if k in meta}
        print(f"classifier weights: {path} {acc}")
        return 0
    from fastinv.models.classifiers import load_classifier

    clf = load_classifier(args.spec, weights=args.weights, random_init=args.random_init,
                          num_classes=args.num_classes)
    n = sum(p.numel() for p in clf.parameters())
    print(json.dumps(dict(spec=args.spec, input_size=clf.input_size, mean=clf.mean, std=clf.std,
                          num_classes=clf.num_classes, parameters=n)))
    return 0
