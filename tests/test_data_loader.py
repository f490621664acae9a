"""make_loader on both backends: batch contents, order, sharding, determinism, bad data."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fastinv.data import dali_available, make_loader, make_synthetic_dataset, scan_source
from fastinv.data.plan import CropConfig, crop_boxes, epoch_order

N, RES, CLS = 61, 32, 24  # 61: shards over 2 and 3 ranks are uneven
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

BACKENDS = [
    "pil",
    pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                  reason="nvidia.dali is not importable")),
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", n=N, resolution=RES,
                                  seed=0, val_fraction=0.0, workers=1)
    return root / "train"


def loader(root, backend, **kw):
    args = dict(resolution=RES, classifier_size=CLS, classifier_mean=MEAN, classifier_std=STD,
                batch_size=8, train=False, backend=backend, num_workers=0, device="cpu")
    args.update(kw)
    return make_loader(root, **args)


def indices(batches):
    return [int(i) for b in batches for i in b["index"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_batches_have_the_documented_shapes_dtypes_and_ranges(synth, backend, train):
    ld = loader(synth, backend, train=train, batch_size=16)
    batches = list(ld)
    assert len(batches) == len(ld) == 4
    for b in batches:
        n = len(b["index"])
        assert b["image"].shape == (n, 3, RES, RES) and b["image"].dtype == torch.float32
        assert b["classifier_input"].shape == (n, 3, CLS, CLS)
        assert b["classifier_input"].dtype == torch.float32
        # NCHW-contiguous from every backend (PIL decodes HWC; channels-last batches crash
        # oneDNN's AVX2 1x1 convolution backward at 4 channels)
        assert b["image"].is_contiguous() and b["classifier_input"].is_contiguous()
        assert b["label"].dtype == b["index"].dtype == torch.int64
        assert b["image"].min() >= -1 and b["image"].max() <= 1
        assert b["image"].std() > 0.1  # real content, not a constant
        lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
        hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
        per_channel = b["classifier_input"].transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all()
        assert (per_channel.max(1).values <= hi + 1e-5).all()
        np.testing.assert_array_equal(b["label"].numpy(), ld.source.labels[b["index"].numpy()])
    assert [len(b["index"]) for b in batches] == [16, 16, 16, 13]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_yields_sorted_file_order_and_labels_from_folders(synth, backend):
    ld = loader(synth, backend)
    assert indices(ld) == list(range(N))
    rel = [p[len(str(synth)) + 1:] for p in ld.source.paths]
    assert rel == sorted(rel, key=lambda p: (p.split("/")[0], p))
    for path, label in zip(ld.source.paths, ld.source.labels):
        assert ld.classes[label] == path.split("/")[-2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_image_is_the_file_itself_at_native_resolution(synth, backend):
    ld = loader(synth, backend, batch_size=4)
    b = next(iter(ld))
    for k in range(4):
        raw = np.asarray(Image.open(ld.source.paths[int(b["index"][k])]), dtype=np.float32)
        got = (b["image"][k].permute(1, 2, 0).numpy() + 1) * 127.5
        np.testing.assert_allclose(got, raw, atol=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_shards_cover_every_sample_exactly_once(synth, backend, world_size, train):
    seen = []
    for rank in range(world_size):
        ld = loader(synth, backend, train=train, rank=rank, world_size=world_size, batch_size=7,
                    seed=5)
        ld.set_epoch(2)
        batches = list(ld)
        assert len(batches) == len(ld) == -(-len(range(rank, N, world_size)) // 7)
        seen += indices(batches)
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_last_gives_every_rank_the_same_full_batches(synth, backend):
    world, bs = 3, 7
    per_rank = []
    for rank in range(world):
        ld = loader(synth, backend, train=True, rank=rank, world_size=world, batch_size=bs,
                    drop_last=True)
        batches = list(ld)
        assert len(batches) == len(ld) == N // (world * bs)
        assert all(len(b["index"]) == bs for b in batches)
        per_rank.append(indices(batches))
    flat = sum(per_rank, [])
    assert len(flat) == len(set(flat)) == (N // (world * bs)) * world * bs


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_is_deterministic_given_seed_and_epoch(synth, backend):
    a = loader(synth, backend, train=True, seed=1)
    b = loader(synth, backend, train=True, seed=1)
    first_a, first_b = list(a), list(b)
    for x, y in zip(first_a, first_b):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["classifier_input"], y["classifier_input"])
    second = list(a)  # the next iteration is the next epoch: another order
    assert indices(second) != indices(first_a) and sorted(indices(second)) == list(range(N))
    a.set_epoch(0)  # back to epoch 0: the same batches again
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(list(a), first_a))
    other_seed = loader(synth, backend, train=True, seed=2)
    assert indices(other_seed) != indices(first_a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_crops_and_flips_vary(synth, backend):
    ld = loader(synth, backend, train=True, crop_scale=(0.3, 0.6), batch_size=N)
    full = loader(synth, backend, train=False, batch_size=N)
    a, e = next(iter(ld)), next(iter(full))
    order = torch.argsort(a["index"])
    assert (a["image"][order] - e["image"]).abs().mean() > 0.05


def test_crop_plan_is_independent_of_sharding_and_stays_inside_the_image():
    sizes = np.array([[640, 427], [30, 200], [64, 64]] * 50)
    index = np.arange(len(sizes))
    cfg = CropConfig()
    boxes, flips = crop_boxes(sizes, index, train=True, seed=0, epoch=3, config=cfg)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= 1).all()
    assert (boxes[:, 0] + boxes[:, 2] <= sizes[index, 0]).all()
    assert (boxes[:, 1] + boxes[:, 3] <= sizes[index, 1]).all()
    assert 0.3 < flips.mean() < 0.7
    sub, _ = crop_boxes(sizes, index[1::3], train=True, seed=0, epoch=3, config=cfg)
    np.testing.assert_array_equal(sub, boxes[1::3])
    order = epoch_order(10, train=True, seed=0, epoch=1, rank=1, world_size=3, batch_size=2,
                        drop_last=False)
    assert sum(len(b) for b in order) == 3


def _write_bad_files(folder):
    """A garbage .jpg, a truncated JPEG, a truncated PNG next to good images."""
    good = sorted(folder.glob("*.jpg"))[0]
    (folder / "zz_garbage.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    data = good.read_bytes()
    (folder / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.open(good).save(folder / "zz_truncated.png")
    png = (folder / "zz_truncated.png").read_bytes()
    (folder / "zz_truncated.png").write_bytes(png[: len(png) // 2])
    return sorted(str(folder / n) for n in ("zz_garbage.jpg", "zz_truncated.jpg", "zz_truncated.png"))


@pytest.fixture
def with_bad_files(synth, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(synth, root)
    bad = _write_bad_files(next(p for p in sorted(root.iterdir()) if p.is_dir()))
    return root, bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("validate", ["header", "none"])
def test_corrupt_files_are_skipped_counted_and_reported_once(with_bad_files, backend, validate,
                                                             caplog):
    root, bad = with_bad_files
    caplog.set_level(logging.WARNING, logger="fastinv.data")
    ld = loader(root, backend, validate=validate, batch_size=8)
    for _ in range(2):  # two epochs: still reported once
        got = indices(ld)
        good = [i for i, p in enumerate(ld.source.paths) if p not in bad]
        assert sorted(got) == good and len(good) == N
    assert ld.bad_files.count == 3 and sorted(ld.bad_files.paths) == bad
    for path in bad:
        assert sum(path in r.getMessage() for r in caplog.records) == 1
    assert "3 bad file(s)" in str(ld.bad_files)


def test_pil_worker_processes_give_the_same_batches(synth):
    a = loader(synth, "pil", train=True, num_workers=2, seed=4)
    b = loader(synth, "pil", train=True, num_workers=0, seed=4)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_file_lists_with_numeric_or_named_labels(synth, tmp_path, suffix):
    paths = scan_source(synth).paths[:10]
    named = ["b" if k % 2 else "a" for k in range(10)]
    lst = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        lst.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, named)))
    else:
        lst.write_text("".join(f"{p} {k % 3}\n" for k, p in enumerate(paths)))
    ld = loader(lst, "pil", batch_size=4)
    b = list(ld)
    assert indices(b) == list(range(10))
    labels = torch.cat([x["label"] for x in b]).tolist()
    if suffix == ".csv":
        assert ld.classes == ["a", "b"] and labels == [k % 2 for k in range(10)]
    else:
        assert ld.classes == ["0", "1", "2"] and labels == [k % 3 for k in range(10)]


def test_missing_or_empty_roots_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader(tmp_path / "nope", "pil")
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png images"):
        loader(tmp_path, "pil")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="one sub-folder per class"):
        loader(tmp_path, "pil")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        loader(tmp_path / "empty.txt", "pil")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="all 1 files are bad"):
        loader(tmp_path, "pil")


def test_bad_arguments_are_clear_errors(synth):
    with pytest.raises(ValueError, match="backend must be one of"):
        loader(synth, "opencv")
    with pytest.raises(ValueError, match="rank must be in"):
        loader(synth, "pil", rank=2, world_size=2)
    with pytest.raises(ValueError, match="need 3 values"):
        loader(synth, "pil", classifier_mean=(0.5,))
    with pytest.raises(ValueError, match="crop_scale"):
        loader(synth, "pil", crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="validate must be one of"):
        loader(synth, "pil", validate="maybe")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pil_loader_delivers_the_same_batches_on_cuda(synth):
    cpu = list(loader(synth, "pil", train=True, seed=3))
    gpu = list(loader(synth, "pil", train=True, seed=3, device="cuda", num_workers=2))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu):
        for key in ("image", "classifier_input", "label", "index"):
            assert b[key].device.type == "cuda"
            torch.testing.assert_close(b[key].cpu(), a[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_abandoned_epoch_does_not_leak_into_the_next(synth, backend):
    ld = loader(synth, backend, train=True, batch_size=8, seed=7)
    reference = [b["index"].tolist() for b in loader(synth, backend, train=True, batch_size=8,
                                                     seed=7)]
    for _ in ld:
        break  # e.g. an analysis that needs only the first batch
    ld.set_epoch(0)
    assert [b["index"].tolist() for b in ld] == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_can_resume_mid_epoch(synth, backend):
    ld = loader(synth, backend, train=True, batch_size=8, seed=2)
    ld.set_epoch(3)
    full = list(ld)
    ld.set_epoch(3, start_batch=5)
    rest = list(ld)
    assert len(rest) == len(full) - 5
    for a, b in zip(full[5:], rest):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    assert indices(ld) != indices(rest)  # the start applies to one iteration only
    with pytest.raises(ValueError, match="start_batch must be in"):
        ld.set_epoch(0, start_batch=len(ld) + 1)
