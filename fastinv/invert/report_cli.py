"""``fastinv report RUN_DIR``: render report.md and report.html from a run's metrics."""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a `fastinv demo` or `fastinv invert` output folder")


def run(args: argparse.Namespace) -> int:
    from fastinv.invert.report import write_report

    try:
        md, htm = write_report(args.run_dir)
    except FileNotFoundError as exc:
        sys.stderr.write(f"fastinv report: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {md} and {htm}\n")
    return 0
