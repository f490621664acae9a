"""``fastinv bench``: run the kernel benchmarks (pytest-benchmark) of a source checkout, or
``fastinv bench quality [--preset quick ...]``: the inverter-quality benchmark
(``benchmarks/bench_quality.py``; its flags pass through).

The benchmarks live in the repository's ``benchmarks/`` folder next to the package; each prints
reference-eager vs torch.compile vs fastinv with GB/s and % of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def benchmarks_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    if not path.is_dir():
        raise FileNotFoundError(
            f"no benchmarks/ folder next to the fastinv package ({path}); the benchmarks ship with "
            "the source checkout: clone the repository and install it with "
            "`pip install --no-build-isolation -e .`"
        )
    return path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", nargs="*", default=[], help="benchmark names, e.g. hinge cbn spectral_norm (default: all)")
    parser.add_argument("-k", default=None, help="pytest -k expression, e.g. 'cuda and bfloat16'")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after `quality`: bench_quality.py's flags (--preset, --work, ...)")


def run(args: argparse.Namespace) -> int:
    try:
        root = benchmarks_dir()
    except FileNotFoundError as exc:
        sys.stderr.write(f"fastinv bench: {exc}\n")
        return 2
    if args.which == ["quality"]:  # a script, not a pytest-benchmark file: its own flags
        return subprocess.call([sys.executable, str(root / "bench_quality.py"), *args.extra])
    if args.extra:  # flags after the names land here (REMAINDER): parse them as ours
        more = argparse.ArgumentParser(prog="fastinv bench", add_help=False)
        more.add_argument("-k", default=args.k)
        more.add_argument("--rounds", type=int, default=args.rounds)
        known, rest = more.parse_known_args(args.extra)
        if rest:
            sys.stderr.write(f"fastinv bench: unknown arguments {rest} (only `fastinv bench "
                             "quality` takes its own flags)\n")
            return 2
        args.k, args.rounds = known.k, known.rounds
    files = [str(root / f"bench_{w}.py") for w in args.which] or [str(root)]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        sys.stderr.write(f"fastinv bench: no such benchmark: {', '.join(missing)}\n")
        return 2
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "--benchmark-columns=median"]
    if args.k:
        cmd += ["-k", args.k]
    env = None
    if args.rounds:
        env = dict(os.environ, FASTINV_BENCH_ROUNDS=str(args.rounds))
    return subprocess.call(cmd, env=env)
