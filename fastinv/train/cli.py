"""``fastinv train CONFIG [--key=value ...]``: train an inverter (under torchrun for DDP).

CONFIG is a preset (tiny, demo-cpu, imagenet-128) or a YAML file; ``--section.key=value`` or
``--key=value`` (unique key names) override it, ``--resume`` continues the newest checkpoint in
``run.out_dir``, ``--print-config`` shows the resolved config and exits.

    torchrun --nproc_per_node=2 -m fastinv train demo-cpu --classifier.weights=clf.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="preset (tiny, demo-cpu, imagenet-128) or YAML file")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key=value or --section.key=value; --resume; --print-config")


def run(args: argparse.Namespace) -> int:
    from fastinv.train.config import ConfigError, load_config

    overrides = list(args.overrides)
    show = "--print-config" in overrides
    overrides = [o for o in overrides if o != "--print-config"]
    overrides = ["--run.resume=true" if o == "--resume" else o for o in overrides]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        sys.stderr.write(f"fastinv train: {exc}\n")
        return 2
    if show:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from fastinv.train.gan import train_inverter

    try:
        run_dir = train_inverter(cfg)
    except (FileNotFoundError, FileExistsError) as exc:
        sys.stderr.write(f"fastinv train: {exc}\n")
        return 2

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"inverter run: {run_dir}")
    return 0
