"""Each analysis on a tiny random inverter writes its figures and a metrics.json."""

import json

import pytest
import torch
from PIL import Image

from fastinv.invert import analyses
from tests.invert_tiny import one_thread, tiny_pair

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def setup():
    G, C = tiny_pair(seed=0, num_classes=4, resolution=16)
    torch.manual_seed(1)
    images = torch.rand(10, 3, 16, 16) * 2 - 1
    labels = torch.arange(10) % 4
    data = analyses.Images.from_images(C, images, labels)
    return G, C, data


def _png_shape(path):
    with Image.open(path) as im:
        return im.size


def test_invert_is_deterministic_in_the_seed_and_changes_with_it(setup):
    G, _, data = setup
    a = analyses.invert(G, data.logits, seed=3)
    assert a.shape == (10, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, analyses.invert(G, data.logits, seed=3))
    assert not torch.equal(a, analyses.invert(G, data.logits, seed=4))


def test_reconstruct_writes_grid_and_metrics(setup, tmp_path):
    G, C, data = setup
    m = analyses.reconstruct(G, C, data, tmp_path, n_show=4, n_rec=2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_images"] == 10
    for key in ("top1_vs_orig", "top1_vs_label", "logit_cosine", "logit_rel_l2", "psnr", "ssim"):
        assert key in saved and saved[key] == pytest.approx(m[key])
    # 4 rows x 3 columns (original | 2 reconstructions) of 16 px images shown at 128 px
    # (nearest-neighbour x8: small images are unreadable at their own size), 2 px padding
    assert _png_shape(tmp_path / "reconstruct.png") == (3 * 130 + 2, 4 * 130 + 2)


def test_resample_std_map_is_positive_for_a_noise_dependent_generator(setup, tmp_path):
    G, C, data = setup
    m = analyses.resample(G, C, data, tmp_path, k=3, n_show=2)
    assert m["k"] == 3 and m["noise_std"] > 0
    assert (tmp_path / "resample.png").is_file() and (tmp_path / "resample_std.png").is_file()
    with pytest.raises(ValueError, match="k >= 2"):
        analyses.resample(G, C, data, tmp_path, k=1)


def test_resample_std_is_zero_when_the_generator_ignores_noise(setup, tmp_path):
    G, C, data = setup

    class NoNoise(torch.nn.Module):
        def __init__(self, g):
            super().__init__()
            self.g = g

        def sample_noise(self, batch, generator=None):
            return self.g.sample_noise(batch, generator)

        def forward(self, logits, noise):
            return self.g(logits, torch.zeros_like(noise))

    m = analyses.resample(NoNoise(G), C, data, tmp_path, k=2, n_show=2)
    assert m["noise_std"] == 0


def test_misclassified_uses_only_wrong_images(setup, tmp_path):
    G, C, data = setup
    m = analyses.misclassified(G, C, data, tmp_path, class_names=["a", "b", "c", "d"])
    wrong = int((data.logits.argmax(1) != data.labels).sum())
    assert m["n_misclassified"] == wrong and wrong > 0
    assert (tmp_path / "misclassified.png").is_file()
    assert "correct_psnr" in m and "psnr_vs_other_images" in m


def test_misclassified_chance_level_averages_other_images_never_the_image_itself(setup, tmp_path):
    rows = torch.tensor([0, 3, 9])
    idx = analyses.other_indices(10, rows, k=64, seed=1)
    assert idx.shape == (3, 9)  # all nine others when fewer than k
    for r, row in zip(rows.tolist(), idx.tolist()):
        assert sorted(row) == [i for i in range(10) if i != r]
    idx = analyses.other_indices(10, rows, k=4, seed=1)
    assert idx.shape == (3, 4) and all(len(set(row)) == 4 for row in idx.tolist())
    assert not (idx == rows.view(-1, 1)).any()
    with pytest.raises(ValueError, match="2 images"):
        analyses.other_indices(1, torch.tensor([0]), k=4)
    # an oracle decoder (x̂ = the image whose logits it is given) beats the chance level on
    # every misclassified image
    G, C, data = setup

    class Oracle(torch.nn.Module):
        def sample_noise(self, batch, generator=None):
            return torch.zeros(batch, 1)

        def forward(self, logits, noise):
            match = (logits[:, None, :] == data.logits[None]).all(dim=2).float().argmax(dim=1)
            return data.images[match]

    m = analyses.misclassified(Oracle(), C, data, tmp_path, n_others=5)
    assert m["n_other_images"] == 5 and m["n_misclassified"] > 0
    assert min(m["psnr_per_image"]) == 100.0
    assert max(m["psnr_vs_other_per_image"]) < 100.0


def test_misclassified_with_a_perfect_classifier_says_so(setup, tmp_path):
    G, C, data = setup
    perfect = analyses.Images(data.images, data.logits.argmax(1), data.logits)
    m = analyses.misclassified(G, C, perfect, tmp_path)
    assert m["n_misclassified"] == 0 and "note" in m


@pytest.mark.parametrize("kind", ["shift", "scale", "perturb"])
def test_logit_sweeps_write_one_entry_per_value(setup, tmp_path, kind):
    G, C, data = setup
    values = [0.0, 1.0, 2.0] if kind != "scale" else [0.5, 1.0, 2.0]
    m = analyses.logit_sweep(G, C, data, tmp_path, kind=kind, values=values, n_show=3)
    assert [e["value"] for e in m["per_value"]] == values
    assert (tmp_path / f"{kind}.png").is_file() and (tmp_path / f"{kind}_curves.png").is_file()


def test_identity_manipulations_reproduce_plain_reconstruction(setup, tmp_path):
    G, C, data = setup
    base = analyses.invert(G, data.logits, seed=0)
    for kind, v in (("shift", 0.0), ("scale", 1.0), ("perturb", 0.0)):
        z = analyses.modify_logits(kind, data.logits, v)
        assert torch.equal(analyses.invert(G, z, seed=0), base)
    with pytest.raises(ValueError, match="unknown logit manipulation"):
        analyses.modify_logits("rotate", data.logits, 1.0)


def test_collect_images_spreads_over_a_class_sorted_dataset():
    _, C = tiny_pair(seed=0)
    labels = torch.arange(40) // 10  # sorted by class, as an evaluation loader walks files
    batches = [{"image": torch.zeros(8, 3, 16, 16), "classifier_input": torch.zeros(8, 3, 16, 16),
                "label": labels[i:i + 8], "index": torch.arange(i, i + 8)} for i in range(0, 40, 8)]
    first = analyses.collect_images(batches, C, 8, "cpu")
    assert first.labels.unique().tolist() == [0]
    spread = analyses.collect_images(batches, C, 8, "cpu", dataset_size=40)
    assert len(spread) == 8 and len(spread.labels.unique()) > 1
    assert torch.equal(spread.labels, labels[spread.index])
    # the same subset taken from a whole-dataset collection, without a second pass
    whole = analyses.collect_images(batches, C, 10**9, "cpu", dataset_size=40)
    assert len(whole) == 40 and whole.sample(40) is whole
    again = whole.sample(8)
    assert torch.equal(again.index, spread.index) and torch.equal(again.labels, spread.labels)
    assert torch.allclose(again.logits, spread.logits, atol=1e-6)
    with pytest.raises(ValueError, match="dataset index"):
        analyses.Images(whole.images, whole.labels, whole.logits).sample(8)
