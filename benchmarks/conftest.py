"""Shared benchmark machinery: every benchmark here records what it moved, and the session ends
with one table per case comparing reference-eager, torch.compile and fastinv side by side, in
time, GB/s and % of the device's copy bandwidth measured in the same run.

Use the ``measure`` fixture::

    def test_x(measure):
        measure(fn, op="hinge", case="10M fp32 fwd+bwd", impl="fastinv", nbytes=..., device=dev)
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import pytest
import torch

_COPY_BW: dict[str, float] = {}
_ROWS: list[Row] = []


@dataclass
class Row:
    op: str
    case: str
    impl: str
    device: str
    median_s: float
    nbytes: int
    launches: int | None = None


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device | str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), measured once per device."""
    key = str(torch.device(device))
    if key not in _COPY_BW:
        n = (256 << 20) // 4 if torch.device(device).type == "cuda" else (64 << 20) // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        sync(device)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            dst.copy_(src)
            sync(device)
            times.append(time.perf_counter() - t0)
        _COPY_BW[key] = 2 * src.numel() * src.element_size() / min(times)
    return _COPY_BW[key]


@pytest.fixture
def measure(benchmark):
    def run(fn, *, op: str, case: str, impl: str, nbytes: int, device, launches: int | None = None):
        dev = torch.device(device)
        copy_bandwidth(dev)

        def timed():
            out = fn()
            sync(dev)  # the time must include the kernels, not just their launch
            return out

        for _ in range(2):
            timed()  # warm-up: compile, caches, allocator
        rounds = int(os.environ.get("FASTINV_BENCH_ROUNDS", "10"))
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        median = statistics.median(benchmark.stats.stats.data)
        benchmark.extra_info.update(op=op, case=case, impl=impl, nbytes=nbytes)
        _ROWS.append(Row(op, case, impl, str(dev), median, nbytes, launches))

    return run


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("fastinv comparison (median time; GB/s of the bytes the op must move)")
    for dev, bw in _COPY_BW.items():
        tr.write_line(f"copy bandwidth {dev}: {bw / 1e9:.1f} GB/s (read+write, measured this run)")
    cases: dict[tuple[str, str, str], list[Row]] = {}
    for r in _ROWS:
        cases.setdefault((r.op, r.case, r.device), []).append(r)
    header = f"{'op':<14}{'case':<40}{'impl':<18}{'ms':>10}{'GB/s':>9}{'%copy':>7}{'vs eager':>10}{'launches':>9}"
    tr.write_line(header)
    for (op, case, dev), rows in cases.items():
        base = next((r.median_s for r in rows if r.impl == "reference-eager"), None)
        for r in rows:
            gbs = r.nbytes / r.median_s / 1e9
            pct = 100 * r.nbytes / r.median_s / _COPY_BW[dev]
            speed = f"{base / r.median_s:.2f}x" if base else "-"
            launches = "" if r.launches is None else str(r.launches)
            tr.write_line(
                f"{op:<14}{(case + ' ' + dev)[:39]:<40}{r.impl:<18}{r.median_s * 1e3:>10.3f}"
                f"{gbs:>9.2f}{pct:>6.0f}%{speed:>10}{launches:>9}"
            )
