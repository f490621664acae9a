"""Scanning a dataset: the scan cache and the multi-process scan give the same answer."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fastinv.data import scan_cache, scan_source, sources


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTINV_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            size = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
            Image.new("RGB", size, (i * 40, 0, 0)).save(root / c / f"{i}.jpg")
    (root / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root


def _same(a, b):
    assert a.paths == b.paths and a.classes == b.classes
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    assert a.bad_files.entries == b.bad_files.entries


def test_sizes_are_read_from_headers(folder):
    s = scan_source(folder, cache=False)
    for path, (w, h) in zip(s.paths, s.sizes):
        assert Image.open(path).size == (w, h)
    assert s.bad_files.paths == [str(folder / "b" / "bad.png")]


def test_cache_is_reused_while_files_are_unchanged(folder, monkeypatch):
    first = scan_source(folder, cache=True)
    assert scan_cache.cache_path(folder, "header").is_file()
    calls = []
    monkeypatch.setattr(sources, "_inspect", lambda p, v: calls.append(p))
    _same(scan_source(folder, cache=True), first)  # served from the cache
    assert calls == []


def test_cache_is_ignored_after_a_file_changes(folder):
    scan_source(folder, cache=True)
    target = folder / "a" / "0.jpg"
    Image.new("RGB", (50, 7)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    again = scan_source(folder, cache=True)
    assert tuple(again.sizes[again.paths.index(str(target))]) == (50, 7)


def test_multi_process_scan_matches_threaded_scan(folder, monkeypatch):
    threaded = scan_source(folder, cache=False)
    monkeypatch.setattr(sources, "PROCESS_SCAN_MIN_FILES", 1)
    _same(scan_source(folder, cache=False), threaded)
