"""Bad data at volume, through both loaders: a folder of real images mixed with truncated
JPEGs and PNGs, zero-byte files, wrong extensions, 16-bit PNGs, CMYK, greyscale, palette,
images over PIL's decompression-bomb limit and files that vanish between scan and read.

The epoch completes, every bad file is skipped, counted and named in the report, and the PIL
and DALI loaders yield the same samples with the same pixels (to the tolerances of
tests/test_data_dali.py)."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastinv.data import dali_available, make_loader, make_synthetic_dataset
from fastinv.data.pil_loader import decode_crop

BACKENDS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia.dali is not importable"))]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# bomb.png is meant to trip PIL's warning; the scan reports it as a bad file
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, row) -> bytes:
    """A valid PNG written by hand (PIL cannot write 16-bit RGB, nor a huge image cheaply);
    ``row(y)`` gives the raw bytes of line ``y``."""
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\x00" + row(y)) for y in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _build(root: Path, real: list[Path], photo: Image.Image) -> tuple[list[str], list[str]]:
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    good: dict[Path, bytes] = {}
    bad: dict[Path, bytes] = {}
    for k, src in enumerate(real):
        good[(a if k % 2 else b) / f"real_{k:02d}.jpg"] = src.read_bytes()
    jpeg, png = _encoded(photo, "JPEG", quality=90), _encoded(photo, "PNG")
    good |= {
        a / "rgb.png": png,
        a / "grey.jpg": _encoded(photo.convert("L"), "JPEG", quality=90),
        b / "grey.png": _encoded(photo.convert("L"), "PNG"),
        b / "palette.png": _encoded(photo.convert("P"), "PNG"),
        b / "grey_alpha.png": _encoded(photo.convert("LA"), "PNG"),
        a / "cmyk.jpg": _encoded(photo.convert("CMYK"), "JPEG", quality=90),
        a / "png_named.jpg": png,  # wrong extension, good content: decoded by content
        b / "jpeg_named.png": jpeg,
    }
    grey = np.asarray(photo.convert("L"), dtype=np.float64)
    g16 = np.rint(grey * 257).astype(">u2")  # full 16-bit range
    good[a / "grey16.png"] = _png(g16.shape[1], g16.shape[0], 16, 0, lambda y: g16[y].tobytes())
    rgb16 = (np.asarray(photo, dtype=np.uint16) * 257).astype(">u2")
    good[b / "rgb16.png"] = _png(rgb16.shape[1], rgb16.shape[0], 16, 2, lambda y: rgb16[y].tobytes())

    bad |= {a / "zero.jpg": b"", b / "zero.png": b"",
            a / "text.jpg": b"this is not an image\n" * 20,
            b / "random.jpg": np.random.default_rng(0).bytes(5000),
            b / "gif_named.png": _encoded(photo, "GIF"),
            a / "bmp_named.jpg": _encoded(photo, "BMP")}
    for cut in (20, 300, len(jpeg) // 2, len(jpeg) - 2):
        bad[a / f"truncated_{cut}.jpg"] = jpeg[:cut]
    for cut in (30, 100, len(png) // 2, len(png) - 12):
        bad[b / f"truncated_{cut}.png"] = png[:cut]
    # just over PIL's limit (where PIL only warns and would decode 90 MB) and over twice it
    limit = Image.MAX_IMAGE_PIXELS
    for path, w, factor in ((a / "bomb.png", 10_000, 1), (b / "bomb2.png", 20_000, 2)):
        zeros = bytes(w)
        bad[path] = _png(w, factor * limit // w + 10, 8, 0, lambda y, z=zeros: z)
    for path, data in (good | bad).items():
        path.write_bytes(data)
    (a / "notes.txt").write_text("not an image extension: never listed")
    return sorted(map(str, good)), sorted(map(str, bad))


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    import sklearn

    tmp = tmp_path_factory.mktemp("fuzz")
    ds = make_synthetic_dataset(tmp / "ds", n=8, resolution=32, seed=0, val_fraction=0.0,
                                workers=1)
    photo = Image.open(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg")
    photo = photo.convert("RGB").resize((96, 64), Image.BILINEAR)
    good, bad = _build(tmp / "mixed", sorted((ds / "train").rglob("*.jpg")), photo)
    return tmp / "mixed", good, bad


def _loader(root, backend, **kw):
    args = dict(resolution=32, classifier_size=24, classifier_mean=MEAN, classifier_std=STD,
                batch_size=8, train=False, backend=backend, num_workers=0, device="cpu",
                jpeg_draft=False)
    return make_loader(root, **(args | kw))


def _levels(batch, key):
    x = batch[key].double()
    if key == "image":
        return (x + 1) * 127.5
    return (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_completes_and_every_bad_file_is_skipped_counted_and_named(fuzz, backend):
    root, good, bad = fuzz
    ld = _loader(root, backend)
    assert sorted(ld.source.paths) == good
    for _ in range(2):  # a second epoch reports nothing new
        batches = list(ld)
        got = torch.cat([b["index"] for b in batches]).tolist()
        assert sorted(got) == list(range(len(good)))
    assert ld.bad_files.count == len(bad) and sorted(ld.bad_files.paths) == bad
    report = str(ld.bad_files)
    assert f"{len(bad)} bad file(s) skipped" in report
    assert all(path in report for path in bad)
    reasons = {Path(e.path).name: e.reason for e in ld.bad_files.entries}
    assert "decompression-bomb limit" in reasons["bomb.png"]
    assert "DecompressionBomb" in reasons["bomb2.png"]
    assert "unsupported format GIF" in reasons["gif_named.png"]


def test_pil_and_dali_yield_the_same_samples_and_pixels(fuzz):
    if not dali_available():
        pytest.skip("nvidia.dali is not importable")
    root, _, _ = fuzz
    pil, dali = list(_loader(root, "pil")), list(_loader(root, "dali"))
    assert len(pil) == len(dali)
    for a, b in zip(pil, dali):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
    for key in ("image", "classifier_input"):
        d = torch.cat([_levels(a, key) - _levels(b, key) for a, b in zip(pil, dali)]).abs()
        per_image = d.flatten(1).max(1).values
        assert d.mean() <= 0.5 and per_image.max() <= 8.01, (key, d.mean().item(), per_image.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_that_vanish_between_scan_and_read_are_skipped_and_named(fuzz, backend, tmp_path):
    root, good, _ = fuzz
    copy = tmp_path / "mixed"
    shutil.copytree(root, copy)
    ld = _loader(copy, backend)
    gone = [ld.source.paths[1], ld.source.paths[-2]]  # in the first batch and in the last
    for path in gone:
        Path(path).unlink()
    got = torch.cat([b["index"] for b in ld]).tolist()
    kept = [i for i, p in enumerate(ld.source.paths) if p not in gone]
    assert sorted(got) == kept
    for path in gone:
        assert path in ld.bad_files.paths
        entry = next(e for e in ld.bad_files.entries if e.path == path)
        assert "FileNotFoundError" in entry.reason or "No such file" in entry.reason


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped(fuzz):
    """PIL's own convert("RGB") clips a 16-bit grey PNG to white above level 255."""
    root, _, _ = fuzz
    (out,) = decode_crop(str(root / "a" / "grey16.png"), (0, 0, 96, 64), False, [64], draft=False)
    (ref,) = decode_crop(str(root / "b" / "grey.png"), (0, 0, 96, 64), False, [64], draft=False)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
