"""``fastinv data``: make the synthetic factor dataset; inspect a dataset."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    synth = sub.add_parser("synth", help="write the synthetic factor dataset (ImageFolder + factors.csv)")
    synth.add_argument("--out", required=True, help="directory to create")
    synth.add_argument("--n", type=int, default=20000, help="number of images (train + val)")
    synth.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--val-fraction", type=float, default=0.1)
    synth.add_argument("--num-classes", type=int, default=10, help="number of shapes (1-10)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    inspect = sub.add_parser("inspect", help="count images per class and list bad files")
    inspect.add_argument("root", help="ImageFolder directory or .txt/.csv file list")
    inspect.add_argument("--validate", choices=("header", "decode", "none"), default="header")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (OSError, ValueError) as exc:  # bad paths and arguments: a message, not a traceback
        print(f"fastinv data {args.data_command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from fastinv.data.synth import make_synthetic_dataset

        start = time.perf_counter()
        out = make_synthetic_dataset(args.out, n=args.n, resolution=args.resolution,
                                     seed=args.seed, val_fraction=args.val_fraction,
                                     num_classes=args.num_classes, workers=args.workers)
        seconds = time.perf_counter() - start
        print(f"wrote {args.n} images ({args.resolution}px) to {out} in {seconds:.1f} s "
              f"({args.n / seconds:.0f} images/s); factors in {out / 'factors.csv'}")
        return 0
    if args.data_command == "inspect":
        from fastinv.data.sources import scan_source

        source = scan_source(args.root, validate=args.validate)
        counts = Counter(source.labels.tolist())
        print(f"{args.root}: {len(source)} readable images, {len(source.classes)} classes, "
              f"{source.bad_files.count} bad files")
        for label, name in enumerate(source.classes):
            print(f"  {label:4d} {name}: {counts.get(label, 0)}")
        if source.bad_files.count:
            print(source.bad_files)
        return 0
    print("usage: fastinv data {synth,inspect} ... (see fastinv data --help)")
    return 2
