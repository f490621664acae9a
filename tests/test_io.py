"""fastinv.io: every file the package writes appears whole or not at all."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from fastinv import io as fio

PACKAGE = Path(__file__).resolve().parent.parent / "fastinv"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    fio.atomic_write_json(path, {"psnr": 20.0})

    def half_then_crash(fh):
        fh.write(b'{"psnr": 2')
        raise KeyboardInterrupt  # killed mid-write, as far as this process can tell

    with pytest.raises(KeyboardInterrupt):
        fio.atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"psnr": 20.0}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_writers_round_trip(tmp_path, fsync):
    fio.atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01", fsync=fsync)  # makes parents
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    fio.atomic_write_text(tmp_path / "t.md", "héllo")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo"
    fio.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    from safetensors.torch import load_file

    fio.atomic_save_safetensors({"w": torch.ones(2, 2).t()}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.ones(2, 2))
    assert _leftovers(tmp_path) == []


def test_images_and_figures_take_their_format_from_the_suffix(tmp_path):
    from PIL import Image

    fio.atomic_save_image(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").format == "PNG"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fio.atomic_savefig(fig, tmp_path / "f.png", dpi=20)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_classifier_weights_and_sidecar_are_written_atomically(tmp_path):
    from fastinv.models.classifiers import load_classifier, save_small_resnet
    from fastinv.models.small_resnet import SmallResNet

    net = SmallResNet(3, 8, 1)
    path = save_small_resnet(net, tmp_path / "clf", input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert path.name == "clf.safetensors" and (tmp_path / "clf.json").is_file()
    assert _leftovers(tmp_path) == []
    clf = load_classifier("fastinv:small_resnet", weights=str(path))
    assert clf.num_classes == 3


def test_remove_stale_tmp_leaves_live_writers_and_other_files(tmp_path):
    import os

    (tmp_path / f".a.json.{os.getpid()}.tmp").write_text("mine, dead by definition")
    (tmp_path / f".b.json.{os.getppid()}.tmp").write_text("a live writer")
    (tmp_path / "c.json").write_text("{}")
    removed = fio.remove_stale_tmp(tmp_path)
    assert [p.name for p in removed] == [f".a.json.{os.getpid()}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.json.{os.getppid()}.tmp", "c.json"]


# Calls that write a file directly, bypassing fastinv.io.
_DIRECT_WRITES = {"write_text", "write_bytes", "save_file", "savez", "savefig", "dump"}
_ALLOWED: set[tuple[str, str]] = set()


def _direct_writes(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if node.args and getattr(node.args[0], "id", "") == "fh":
                continue  # writing into a handle, e.g. the one fastinv.io.atomic_write passes
            if name in _DIRECT_WRITES:
                found.append((name, node.lineno))
            elif name == "save" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch":
                found.append(("torch.save", node.lineno))
            elif name == "open" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                    and str(node.args[1].value).startswith(("w", "a", "x")):
                found.append(("open", node.lineno))
    return found


def test_the_package_writes_files_only_through_fastinv_io():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "io.py":
            continue
        for name, line in _direct_writes(path):
            if (rel, name) not in _ALLOWED:
                offenders.append(f"fastinv/{rel}:{line} {name}")
    assert offenders == [], "write through fastinv.io (atomic) instead:\n" + "\n".join(offenders)
