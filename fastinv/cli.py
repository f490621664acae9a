"""The ``fastinv`` command: a thin layer over functions that tests call directly.

Each subcommand lives in the package that does the work, as a module with
``register(parser)`` (adds its arguments) and ``run(args) -> int``. Only the module of the
command being run is imported (``fastinv info`` does not pay for matplotlib or DALI).

One error policy for every subcommand: a :class:`fastinv.errors.FastinvError` (bad input: a
value, a path, a file), a configuration error or the OS error of a bad path is printed as
``fastinv <command>: <message>`` with exit status 2; ``--debug`` (anywhere on the command line)
prints the traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from fastinv.errors import FastinvError

# name -> (module implementing register/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("fastinv.info", "versions, devices and which kernel serves each op"),
    "data": ("fastinv.data.cli", "make the synthetic factor dataset; inspect a dataset"),
    "classifier": ("fastinv.train.classifier_cli", "train the small standard / PGD-robust classifiers"),
    "train": ("fastinv.train.cli", "train an inverter G(logits, noise) (torchrun for DDP)"),
    "invert": ("fastinv.invert.cli", "analyses: reconstruct, resample, misclassified, shift, scale, perturb"),
    "report": ("fastinv.invert.report_cli", "render report.md / report.html for a run directory"),
    "bench": ("fastinv.bench", "run the kernel benchmarks (pytest-benchmark)"),
    "demo": ("fastinv.demo", "synthetic data -> classifiers -> inverters -> analyses -> report"),
}


def _load(name: str):
    return importlib.import_module(COMMANDS[name][0])


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and registers its arguments (the
    others appear in the help by their one-line description)."""
    parser = argparse.ArgumentParser(
        prog="fastinv",
        description="Invert an image classifier's logits with a feedforward BigGAN inverter.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback as well as the message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load(name).register(p)
        p.set_defaults(_command=name)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What counts as bad input rather than a bug (see the module docstring)."""
    errors: tuple[type[BaseException], ...] = (FastinvError, OSError)
    try:
        from fastinv.train.config import ConfigError
    except ImportError:
        return errors
    return errors if issubclass(ConfigError, FastinvError) else (*errors, ConfigError)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FastinvError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere: subcommands (train) pass the rest of the line through
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_of(argv))
    # `--key=value` overrides before any positional (`fastinv classifier train --data=DIR`)
    # are not argparse options: commands that take overrides collect them as such
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*extra, *(args.overrides or [])]
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 0
    mod = _load(args._command)
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"fastinv {args._command}: interrupted\n")
        return 130
    except _user_errors() as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"fastinv {args._command}: {_message(exc)}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
