"""The ``fastinv`` command: a thin layer over functions that tests call directly.

Each subcommand lives in the package that does the work, as a module with
``register(parser)`` (adds its arguments) and ``run(args) -> int``. Subcommands whose
module is not there yet say so plainly instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing register/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fastinv.info", "versions, devices and which kernel serves each op"),
    "data": ("fastinv.data.cli", "make the synthetic factor dataset; inspect a dataset"),
    "classifier": ("fastinv.models.cli", "train the small standard / PGD-robust classifiers"),
    "train": ("fastinv.train.cli", "train an inverter G(logits, noise) (torchrun for DDP)"),
    "invert": ("fastinv.invert.cli", "analyses: reconstruct, resample, misclassified, shift, scale, perturb"),
    "report": ("fastinv.invert.report_cli", "render report.md / report.html for a run directory"),
    "bench": ("fastinv.bench", "run the kernel benchmarks (pytest-benchmark)"),
    "demo": ("fastinv.demo", "synthetic data -> classifiers -> inverters -> analyses -> report"),
}


def _load(name: str):
    module, _ = COMMANDS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
            return None  # not built yet
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinv",
        description="Invert an image classifier's logits with a feedforward BigGAN inverter.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        mod = _load(name)
        p = sub.add_parser(name, help=help_text if mod else f"{help_text} [not built yet]",
                           description=help_text)
        if mod is not None:
            mod.register(p)
        p.set_defaults(_command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 0
    mod = _load(args._command)
    if mod is None:
        sys.stderr.write(
            f"fastinv {args._command}: this subcommand is planned but not built in this version.\n"
        )
        return 2
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
