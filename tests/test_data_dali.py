"""The DALI pipeline (CPU-only here: device_id=None) agrees with the PIL reference loader.

Both execute the same plan (same samples, crops and flips), so differences come only from the
JPEG decoders and the resamplers. Tolerances, in 8-bit levels (0-255) of the output images:

- synthetic 32 px JPEGs, no JPEG draft involved: mean |diff| <= 0.5, max <= 8 levels
  (the 32 -> 24 classifier resize rounds differently in a few pixels);
- photographs (scikit-learn's china.jpg, flower.jpg), full decode in both
  (``jpeg_draft=False``): mean <= 0.5 level, PSNR >= 45 dB (measured about 0.1 and 52-57 dB);
- photographs with the PIL loader's default DCT-scaled decode (``Image.draft``): mean <= 5
  levels, PSNR >= 30 dB (measured 1.1-3.3 levels, 32-43 dB): libjpeg's 1/2-1/8 scaled IDCT is
  another downsampling filter than DALI's full decode + antialiased resize.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinv.data import dali_available, make_loader, make_synthetic_dataset

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _levels(batch, key):
    x = batch[key].double().cpu()
    if key == "image":
        return (x + 1) * 127.5
    return (x * torch.tensor(STD).view(1, 3, 1, 1).double()
            + torch.tensor(MEAN).view(1, 3, 1, 1).double()) * 255


def _both(root, **kw):
    args = dict(classifier_mean=MEAN, classifier_std=STD, num_workers=0, device="cpu")
    args.update(kw)
    pil = list(make_loader(root, backend="pil", **args))
    dali = list(make_loader(root, backend="dali", **args))
    assert len(pil) == len(dali) > 0
    for a, b in zip(pil, dali):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
    return pil, dali


def _diff(pil, dali, key):
    d = torch.cat([_levels(a, key) - _levels(b, key) for a, b in zip(pil, dali)]).abs()
    psnr = 10 * np.log10(255**2 / max((d**2).mean().item(), 1e-12))
    return d.mean().item(), d.max().item(), psnr


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import sklearn

    images = Path(sklearn.__file__).parent / "datasets" / "images"
    root = tmp_path_factory.mktemp("photos")
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(images / name, root / name)
    (root / "list.csv").write_text("path,label\nchina.jpg,0\nflower.jpg,1\n")
    return root / "list.csv"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", n=40, resolution=32,
                                  seed=1, val_fraction=0.0, workers=1)
    return root / "train"


@pytest.mark.parametrize("train", [False, True])
def test_dali_cpu_matches_pil_on_synthetic_images(synth, train):
    pil, dali = _both(synth, resolution=32, classifier_size=24, batch_size=16, train=train)
    for key in ("image", "classifier_input"):
        mean, worst, _ = _diff(pil, dali, key)
        assert mean <= 0.5 and worst <= 8, (key, mean, worst)


@pytest.mark.parametrize("resolution", [64, 128])
@pytest.mark.parametrize("train", [False, True])
def test_dali_cpu_matches_pil_on_photographs_with_full_decode(photos, resolution, train):
    pil, dali = _both(photos, resolution=resolution, classifier_size=resolution * 3 // 4,
                      batch_size=2, train=train, jpeg_draft=False)
    for key in ("image", "classifier_input"):
        mean, _, psnr = _diff(pil, dali, key)
        assert mean <= 0.5 and psnr >= 45, (key, mean, psnr)


@pytest.mark.parametrize("resolution", [64, 128])
@pytest.mark.parametrize("train", [False, True])
def test_dali_cpu_matches_pil_on_photographs_with_draft_decode(photos, resolution, train):
    pil, dali = _both(photos, resolution=resolution, classifier_size=resolution * 3 // 4,
                      batch_size=2, train=train)
    for key in ("image", "classifier_input"):
        mean, _, psnr = _diff(pil, dali, key)
        assert mean <= 5 and psnr >= 30, (key, mean, psnr)


def test_dali_cpu_pipeline_outputs_cpu_tensors_by_default_without_cuda(synth):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the default device is the GPU")
    ld = make_loader(synth, resolution=32, classifier_size=24, classifier_mean=MEAN,
                     classifier_std=STD, batch_size=8, train=False, backend="dali")
    assert ld.backend == "dali" and ld.device_id is None
    assert next(iter(ld))["image"].device.type == "cpu"


def test_auto_backend_picks_dali_when_importable(synth):
    ld = make_loader(synth, resolution=32, classifier_size=24, classifier_mean=MEAN,
                     classifier_std=STD, batch_size=8, train=False, backend="auto", device="cpu")
    assert ld.backend == "dali"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_gpu_decoding_matches_pil(synth):
    pil, dali = _both(synth, resolution=32, classifier_size=24, batch_size=16, train=True,
                      device="cuda")
    assert dali[0]["image"].device.type == "cuda"
    for key in ("image", "classifier_input"):
        d = torch.cat([_levels(a, key) - _levels(b, key) for a, b in zip(pil, dali)])
        assert d.abs().mean() <= 1.0, key  # nvJPEG vs libjpeg: a level or so


def test_dali_and_pil_agree_on_grey_palette_alpha_and_cmyk_files(photos, tmp_path):
    from PIL import Image

    rgb = Image.open(photos.parent / "china.jpg").resize((96, 64))
    folder = tmp_path / "modes" / "a"
    folder.mkdir(parents=True)
    rgb.convert("L").save(folder / "grey.jpg")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("P").save(folder / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    pil, dali = _both(folder.parent, resolution=64, classifier_size=48, batch_size=8,
                      train=False, jpeg_draft=False)
    assert len(pil[0]["index"]) == 5
    for key in ("image", "classifier_input"):
        mean, worst, _ = _diff(pil, dali, key)
        assert mean <= 0.5 and worst <= 8, (key, mean, worst)
