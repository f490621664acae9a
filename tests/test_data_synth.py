"""The synthetic factor dataset: deterministic, factors.csv describes the images on disk."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from fastinv.cli import main as cli_main
from fastinv.data import (
    CLASS_NAMES,
    FACTOR_COLUMNS,
    TEXTURES,
    dataset_classes,
    load_factors,
    make_synthetic_dataset,
    scan_source,
)
from fastinv.data.synth import draw_factors, render

N, RES = 60, 32


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", n=N, resolution=RES,
                                  seed=3, workers=2)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files_for_any_worker_count(synth, tmp_path):
    again = make_synthetic_dataset(tmp_path / "again", n=N, resolution=RES, seed=3, workers=1)
    assert _digest(again) == _digest(synth)


def test_other_seed_gives_other_images(synth, tmp_path):
    other = make_synthetic_dataset(tmp_path / "other", n=N, resolution=RES, seed=4, workers=1)
    assert _digest(other) != _digest(synth)


def test_layout_split_and_columns(synth):
    f = load_factors(synth)
    assert set(f) == {"path", "split", "class", "class_name", *FACTOR_COLUMNS}
    assert len(f["path"]) == N
    assert (f["split"] == "val").sum() == round(N * 0.1)
    for path, name, cls in zip(f["path"], f["class_name"], f["class"]):
        assert (synth / path).is_file()
        assert path.split("/")[1] == name == CLASS_NAMES[cls]
        with Image.open(synth / path) as im:
            assert im.format == "JPEG" and im.size == (RES, RES) and im.mode == "RGB"
    assert f["class"].dtype == np.int64 and f["x"].dtype == np.float64
    assert set(np.unique(f["texture"])) <= set(range(len(TEXTURES)))


def test_factor_rows_follow_loader_index_order(synth):
    for split in ("train", "val"):
        f = load_factors(synth, split=split)
        source = scan_source(synth / split)
        assert [str(synth / p) for p in f["path"]] == source.paths
        np.testing.assert_array_equal(f["class"], source.labels)
    # ImageFolder labels are the synth class indices
    assert dataset_classes(synth / "train") == [n for n in CLASS_NAMES if (synth / "train" / n).is_dir()]


def _foreground_weight(img: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per-pixel coverage estimate: the pixel's position between bg and fg colour."""
    d = fg - bg
    return np.clip(((img - bg) @ d) / (d @ d), 0, 1)


def test_measured_centroid_and_colours_match_factors(synth):
    f = load_factors(synth)
    ys, xs = np.mgrid[0:RES, 0:RES] + 0.5
    checked = 0
    for i in np.flatnonzero(f["texture"] == TEXTURES.index("flat")):
        img = np.asarray(Image.open(synth / f["path"][i]), dtype=np.float64) / 255
        fg = np.array([f["fg_r"][i], f["fg_g"][i], f["fg_b"][i]])
        bg = np.array([f["bg_r"][i], f["bg_g"][i], f["bg_b"][i]])
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # all background
        np.testing.assert_allclose(np.median(border, axis=0), bg, atol=0.03)
        w = _foreground_weight(img, fg, bg)
        cx, cy = (w * xs).sum() / w.sum() / RES, (w * ys).sum() / w.sum() / RES
        assert abs(cx - f["x"][i]) < 0.03 and abs(cy - f["y"][i]) < 0.03, (i, cx, cy)
        # the area grows with scale**2: compare with the rendered mask's area
        _, mask = render({k: f[k][i] for k in ("class", *FACTOR_COLUMNS)}, RES)
        inside, expected = (w > 0.5).sum(), (mask > 0.5).sum()
        assert abs(inside - expected) <= 0.1 * expected + 4, (i, inside, expected)
        checked += 1
    assert checked >= 10


def test_render_rotation_turns_the_mask():
    row = {k: v[0] for k, v in draw_factors(1, seed=0).items()}
    row.update({"class": CLASS_NAMES.index("ellipse"), "x": 0.5, "y": 0.5, "scale": 0.3})
    flat = render({**row, "rotation": 0.0}, 64)[1]
    upright = render({**row, "rotation": 90.0}, 64)[1]
    assert flat[:, 32].sum() < upright[:, 32].sum()  # the long axis turned vertical
    diff = np.abs(upright - flat.T)  # equal up to the rasteriser's edge rules
    assert diff.max() < 0.25 and diff.sum() < 0.02 * flat.sum()


def test_factors_are_drawn_independently():
    f = draw_factors(20000, seed=0)
    names = ["x", "y", "scale", "rotation", "bg_r", "fg_g"]
    corr = np.corrcoef(np.stack([f[n] for n in names] + [f["class"].astype(float)]))
    off_diagonal = corr[~np.eye(len(corr), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.05
    assert np.bincount(f["class"]).min() > 0.08 * 20000


def test_cli_synth_writes_the_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["data", "synth", "--out", str(out), "--n", "20", "--resolution", "16",
                     "--seed", "1", "--val-fraction", "0.25", "--workers", "1"]) == 0
    assert "wrote 20 images" in capsys.readouterr().out
    assert len(load_factors(out, split="val")["path"]) == 5
    assert cli_main(["data", "inspect", str(out / "train")]) == 0
    assert "15 readable images" in capsys.readouterr().out


def test_refuses_to_overwrite_and_rejects_bad_arguments(synth, tmp_path):
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        make_synthetic_dataset(synth, n=10)
    with pytest.raises(ValueError, match="n must be"):
        make_synthetic_dataset(tmp_path / "a", n=0)
    with pytest.raises(ValueError, match="val_fraction"):
        make_synthetic_dataset(tmp_path / "b", n=10, val_fraction=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(tmp_path / "c", n=10, num_classes=11)
    with pytest.raises(FileNotFoundError, match="fastinv data synth"):
        load_factors(tmp_path)


def test_cli_reports_bad_paths_without_a_traceback(synth, tmp_path, capsys):
    assert cli_main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["data", "synth", "--out", str(synth), "--n", "5"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
