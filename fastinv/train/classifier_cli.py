"""``fastinv classifier``: train the small standard / PGD-robust classifier, inspect any spec.

    fastinv classifier train --data DIR --out clf.safetensors [--adversarial l2 --eps 0.5]
    fastinv classifier show fastinv:small_resnet --weights clf.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from fastinv.train.classifier import ClassifierConfig

    hints = typing.get_type_hints(ClassifierConfig)
    for f in dataclasses.fields(ClassifierConfig):
        hint, flag = hints[f.name], "--" + f.name.replace("_", "-")
        if f.name in ("mean", "std"):
            parser.add_argument(flag, type=float, nargs=3, default=f.default)
        elif hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif hint in (int, float, str):
            parser.add_argument(flag, type=hint, default=f.default, required=f.name == "data")
        else:  # int | None, float | None
            base = typing.get_args(hint)[0]
            parser.add_argument(flag, type=base, default=f.default)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="classifier_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train the small ResNet (standard or PGD adversarial)")
    _add_config_flags(train)
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

        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ClassifierConfig)}
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        path = train_classifier(ClassifierConfig(**values))
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
