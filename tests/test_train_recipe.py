"""The inverter recipe's options: each one does what its name says, on tiny runs."""

from __future__ import annotations

import math

import pytest
import torch

from fastinv.models.discriminator import Discriminator, DiscriminatorConfig
from fastinv.train import checkpoint
from fastinv.train.augment import diff_augment, diff_augment_pair, parse_policy
from fastinv.train.config import ConfigError, inverter_options, load_config
from fastinv.train.gan import head_loss, lr_scale, mode_seeking_loss, train_inverter
from tests.train_tiny import tiny_dataset

RECIPE = ["--logit_preprocess=affine", "--d_pool=mean", "--diffaug=translation,cutout",
          "--aux_logit_weight=1", "--crop_min_scale=1", "--in_memory=true"]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _train_option(tmp_path, data, *flags):
    """A 4-step tiny run with ``flags``, logging every 2 steps: (config, run directory)."""
    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={data}", "--steps=4",
                               "--log_every=2", *flags])
    return cfg, train_inverter(cfg)


def test_recipe_run_trains_with_standardised_logits_and_logit_consistency(tmp_path, synthetic_data):
    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=6", "--log_every=2", *RECIPE])
    run_dir = train_inverter(cfg)
    aux = _scalars(run_dir, "aux_logit")
    assert len(aux) == 3 and all(math.isfinite(v) and v > 0 for v in aux)
    G, _ = checkpoint.load_inverter(run_dir)
    # the affine map was fitted to the classifier's logits and travels with the checkpoint
    assert not torch.equal(G.preprocess.shift, torch.zeros_like(G.preprocess.shift))
    assert torch.all(G.preprocess.scale > 0)
    assert inverter_options(cfg) == {"logit consistency": 1.0,
                                     "D augmentation": "translation,cutout",
                                     "logit preprocessing": "affine", "D pooling": "mean"}


def test_r1_penalty_is_applied_lazily_and_logged(tmp_path, synthetic_data):
    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=4", "--log_every=1", "--r1_gamma=10", "--r1_every=2"])
    run_dir = train_inverter(cfg)
    r1 = _scalars(run_dir, "r1")
    assert r1 and all(v > 0 and math.isfinite(v) for v in r1)
    assert inverter_options(cfg) == {"R1": 10.0}


def test_r1_with_phi_feature_d_differentiates_through_phi(tmp_path, synthetic_data):
    """R1 on a D that also reads Φ's maps: the penalty is the gradient of D's score w.r.t. the
    pixels through both paths (D's own trunk and frozen Φ), and a run with it trains."""
    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=4", "--log_every=1", "--classifier.spec=fastinv:small_cnn",
                               "--d_phi_layer=features.7", "--r1_gamma=1", "--r1_every=2"])
    r1 = _scalars(train_inverter(cfg), "r1")
    assert r1 and all(v > 0 and math.isfinite(v) for v in r1)

    from fastinv.models.classifiers import load_classifier
    from fastinv.train.gan import PhiFeatures
    from fastinv.train.regularizers import r1_penalty

    torch.manual_seed(0)
    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4).eval()
    phi = PhiFeatures(clf, "features.7")
    channels, size = phi.shape(16, "cpu")
    D = Discriminator(4, 16, 4, 0, phi_channels=channels, phi_resolution=size)
    x, z = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 4)
    with_phi = r1_penalty(lambda xr, zr: D(xr, zr, phi(xr)[1]), x, z)
    # Φ's map held fixed (no gradient through Φ): a different, smaller-path penalty
    fixed = phi(x)[1].detach()
    without = r1_penalty(lambda xr, zr: D(xr, zr, fixed), x, z)
    assert with_phi > 0 and not torch.allclose(with_phi, without)
    with_phi.backward()
    assert all(p.grad is not None for p in D.phi_in.parameters())


def test_paper_recipe_names_no_option():
    assert inverter_options(load_config("tiny")) == {}


def test_quality_benchmark_paper_row_turns_every_demo_cpu_option_off():
    # bench_quality's "paper" row must be the GAN alone whatever demo-cpu switches on
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bq)
    base = ["--classifier.random_init=true"]
    assert inverter_options(load_config("demo-cpu", base)).get("D logit head") == 1.0
    assert inverter_options(load_config("demo-cpu", base + list(bq.ABLATIONS["paper"]))) == {}
    for overrides in bq.ABLATIONS.values():  # every row is a valid config
        load_config("demo-cpu", base + list(overrides))


def test_in_memory_needs_whole_image_crops():
    with pytest.raises(ConfigError, match="crop_min_scale=1"):
        load_config("tiny", ["--in_memory=true", "--crop_min_scale=0.5"])


def test_bad_augmentation_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown augmentation"):
        load_config("tiny", ["--diffaug=translation,blur"])
    assert parse_policy(" translation , cutout ") == ("translation", "cutout")


def test_diff_augment_pair_gives_both_images_the_same_transforms():
    """Image i of both tensors gets the same shift, hole and flip (b = 2a stays 2a), as one
    diff_augment call would draw them, and the generator ends where that call leaves it."""
    policy = ("translation", "cutout", "flip", "noise")
    a = torch.rand(6, 3, 16, 16) + 0.5
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seen_a, seen_b, _ = diff_augment_pair(a, a.clone(), policy, gen)
    torch.testing.assert_close(seen_a, diff_augment(a, policy, ref_gen), rtol=0, atol=0)
    assert torch.equal(seen_a, seen_b) and torch.equal(gen.get_state(), ref_gen.get_state())
    geometric = ("translation", "cutout", "flip")
    seen_a, seen_b, _ = diff_augment_pair(a, 2 * a, geometric, gen)
    torch.testing.assert_close(seen_b, 2 * seen_a)
    assert (seen_a == 0).any() and not torch.equal(seen_a, a)  # holes and shifts happened
    with pytest.raises(ValueError, match="one shape"):
        diff_augment_pair(a, a[:3], policy, gen)


def test_diff_augment_is_differentiable_and_keeps_shapes():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    y = diff_augment(x, ("translation", "cutout", "color"), gen)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(diff_augment(x, ()), x)


def test_cutout_zeroes_a_quarter_of_the_image_when_inside():
    from fastinv.train.augment import cutout

    x = torch.ones(64, 1, 16, 16)
    out = cutout(x, gen=torch.Generator().manual_seed(0))
    zeroed = (out == 0).float().flatten(1).mean(1)
    assert zeroed.max() <= 0.25 + 1e-6 and zeroed.min() > 0
    # small_cutout: a hole of a quarter of the side, 1/16 of the image at most
    small = diff_augment(x, parse_policy("small_cutout"), torch.Generator().manual_seed(0))
    zeroed = (small == 0).float().flatten(1).mean(1)
    assert zeroed.max() == pytest.approx(1 / 16) and zeroed.min() > 0


def test_d_pooling_scales_the_outputs_by_the_map_area():
    x, z = torch.rand(8, 3, 32, 32) * 2 - 1, torch.randn(8, 10)
    out = {}
    for pool in ("sum", "sqrt", "mean"):
        torch.manual_seed(0)  # the same weights for each pooling
        D = Discriminator(10, 32, ch=8, attention_resolution=0, pool=pool).eval()
        with torch.no_grad():
            out[pool] = D(x, z) - D.linear.bias  # the output layer's bias does not scale
    # D's last map is 8x8 at 32 px: sum = 8 sqrt = 64 mean
    torch.testing.assert_close(out["sum"], 8 * out["sqrt"])
    torch.testing.assert_close(out["sum"], 64 * out["mean"])
    with pytest.raises(ValueError, match="pool must be one of"):
        Discriminator(10, 32, ch=8, attention_resolution=0, pool="max")


def test_memory_loader_serves_every_image_once_per_epoch(synthetic_data):
    from fastinv.data import make_loader
    from fastinv.data.memory import MemoryLoader

    common = dict(resolution=16, classifier_size=16, classifier_mean=(0.5,) * 3,
                  classifier_std=(0.5,) * 3, backend="pil", device="cpu", num_workers=0)
    decoder = make_loader(synthetic_data / "train", batch_size=7, train=False, **common)
    full = torch.cat([b["image"] for b in decoder])
    ml = MemoryLoader(decoder, batch_size=5, drop_last=False, seed=3)
    ml.set_epoch(1)
    seen = torch.cat([b["index"] for b in ml])
    assert sorted(seen.tolist()) == list(range(len(full)))
    ml.set_epoch(1, start_batch=1)
    resumed = torch.cat([b["index"] for b in ml])
    assert torch.equal(resumed, seen[5:])
    batch = next(iter(MemoryLoader(decoder, batch_size=4, train=False)))
    assert torch.allclose(batch["image"], full[:4], atol=1 / 127.5)


def test_memory_loader_serves_cached_logits_of_each_image_as_served(synthetic_data):
    """``cache_logits``: every batch carries the classifier's logits of its own classifier
    input, mirrored images' included (the two views are computed once)."""
    from fastinv.data import make_loader
    from fastinv.data.memory import MemoryLoader

    common = dict(resolution=16, classifier_size=16, classifier_mean=(0.5,) * 3,
                  classifier_std=(0.5,) * 3, backend="pil", device="cpu", num_workers=0)
    decoder = make_loader(synthetic_data / "train", batch_size=7, train=False, **common)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                              torch.nn.LazyLinear(5)).double()
    calls = []

    def fn(t):  # an asymmetric function: a mirrored image gets other logits
        calls.append(len(t))
        return net(t.double()).float()

    ml = MemoryLoader(decoder, batch_size=6, seed=3)
    assert "logits" not in next(iter(ml))
    ml.cache_logits(fn, batch_size=16)
    assert sum(calls) == 2 * len(ml.images)  # each image once as stored, once mirrored
    flipped = 0
    for batch in ml:
        torch.testing.assert_close(batch["logits"], fn(batch["classifier_input"]),
                                   rtol=1e-5, atol=1e-5)
        stored = ml.classifier_inputs[batch["index"]].float()
        flipped += sum(not torch.equal(a, b) for a, b in zip(batch["classifier_input"], stored))
    assert flipped > 0


def test_trainer_caches_the_logits_of_in_memory_data_when_that_is_cheaper(tmp_path,
                                                                          synthetic_data):
    """In-memory data: Φ's logits are computed once (two views an image) when the run would
    otherwise compute more of them, and a step's z is then Φ of its batch; fewer steps than
    that, and Φ runs per step."""
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    def trainer(steps):
        cfg = load_config("tiny", [f"--out_dir={tmp_path / str(steps)}", f"--root={synthetic_data}",
                                   f"--steps={steps}", "--in_memory=true",
                                   "--crop_min_scale=1"])
        return InverterTrainer(cfg, DistInfo()), cfg

    t, cfg = trainer(4)  # 4 steps of 8 images < two views of each image
    assert t.batches.loader.logits is None and "logits" not in t.batches.next()
    t, cfg = trainer(1000)
    loader = t.batches.loader
    assert loader.logits is not None and loader.logits.shape == (2, len(loader.images),
                                                                 t.classifier.num_classes)
    calls = []
    t.classifier.register_forward_hook(lambda m, a, out: calls.append(1))
    batch = t.batches.next()
    with torch.no_grad(), t._autocast():
        direct = t.classifier(t._input(batch["classifier_input"])).float()
    torch.testing.assert_close(batch["logits"], direct, rtol=0.02, atol=0.02)  # (bf16 on AMX)
    calls.clear()
    t.train_step()
    assert not calls  # the step took the cached logits


def test_flip_mirrors_about_half_the_images_and_passes_gradients():
    from fastinv.train.augment import flip

    x = torch.randn(200, 3, 8, 8, requires_grad=True)
    out = flip(x, gen=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x.detach())])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x.detach())])
    assert bool((mirrored | same).all()) and 60 < int(mirrored.sum()) < 140
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_noise_adds_gaussian_pixel_noise_of_its_sigma_and_passes_gradients():
    from fastinv.train.augment import noise

    x = torch.zeros(64, 3, 16, 16, requires_grad=True)
    out = noise(x, sigma=0.1, gen=torch.Generator().manual_seed(0))
    assert abs(out.mean().item()) < 0.005 and abs(out.std().item() - 0.1) < 0.005
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # noise is added: the Jacobian is 1
    same = diff_augment(x.detach(), ("noise",), torch.Generator().manual_seed(0))
    assert torch.equal(same, out.detach())  # D's policy name reaches the same transform


def test_consistency_augmentation_is_named_and_trains(tmp_path, synthetic_data):
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--aux_logit_weight=1",
                                 "--aux_augment=translation,flip")
    assert all(math.isfinite(v) and v > 0 for v in _scalars(run_dir, "aux_logit"))
    assert inverter_options(cfg) == {"logit consistency": 1.0,
                                     "consistency augmentation": "translation,flip"}
    with pytest.raises(ConfigError, match="optim.aux_augment: unknown augmentation"):
        load_config("tiny", ["--aux_augment=rotate"])


def test_phi_feature_d_reads_the_classifier_features_and_trains(tmp_path, synthetic_data):
    """The Φ-feature D option: D gets Φ's tapped map at the matching trunk resolution, both
    D and (through frozen Φ) G get gradients from it, and the run names the option."""
    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=2", "--classifier.spec=fastinv:small_cnn",
                               "--d_phi_layer=features.7", "--ckpt_every=2"])
    run_dir = train_inverter(cfg)
    ck = checkpoint.load(checkpoint.latest_checkpoint(run_dir))
    D_cfg = ck["model_config"]["D"]
    # Φ reads G's 16 px images at its own 32 px input; features.7 follows two 2x poolings
    assert D_cfg["phi_channels"] > 0 and D_cfg["phi_resolution"] == 8
    assert inverter_options(cfg) == {"Φ-feature D": "features.7"}
    G, _ = checkpoint.load_inverter(run_dir)  # G alone loads as before: the option is D's

    from fastinv.models.classifiers import load_classifier
    from fastinv.train.gan import PhiFeatures

    torch.manual_seed(0)
    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)
    phi = PhiFeatures(clf, "features.7")
    assert phi.shape(16, "cpu") == (D_cfg["phi_channels"], 8)
    D = Discriminator(4, 16, 4, 0, phi_channels=D_cfg["phi_channels"], phi_resolution=8)
    x = torch.rand(3, 3, 16, 16, requires_grad=True) * 2 - 1
    x.retain_grad()
    logits, feat = phi(x)
    out = D(x, logits, feat)
    assert out.shape == (3,)
    out.sum().backward()
    grads = [p.grad for p in D.phi_in.parameters()]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass them after the logits"):
        D(x.detach(), logits.detach())


def test_phi_feature_d_auto_taps_the_deepest_map_d_can_take():
    from fastinv.models.classifiers import load_classifier
    from fastinv.models.discriminator import trunk_sizes
    from fastinv.train.gan import PhiFeatures

    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)  # 1 block/stage
    assert trunk_sizes(32) == (16, 8)
    phi = PhiFeatures(clf, "auto", 32, trunk_sizes(32))
    assert phi.layer == "features.10"  # the last ReLU, 8x8, the map Φ max-pools
    assert phi.shape(32, "cpu") == (4 * clf.net.width, 8)
    with pytest.raises(ValueError, match="auto: no module"):
        PhiFeatures(clf, "auto", 32, (3,))


def test_phi_feature_d_errors_name_the_problem():
    with pytest.raises(ValueError, match="never has that size"):
        Discriminator(4, 16, 4, 0, phi_channels=8, phi_resolution=3)
    from fastinv.models.classifiers import load_classifier
    from fastinv.train.gan import PhiFeatures

    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)
    with pytest.raises(ValueError, match="not a module"):
        PhiFeatures(clf, "features.99")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        PhiFeatures(clf, "fc")(torch.zeros(1, 3, 16, 16))


def test_phi_feature_statistics_auto_taps_one_map_per_size():
    from fastinv.models.classifiers import load_classifier
    from fastinv.train.feature_stats import PhiStats

    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)  # 1 block/stage
    stats = PhiStats(clf, "auto", 32)
    # the last module of each size: the 32, 16 and 8 px ReLUs (the max pools open new sizes)
    assert stats.layers == ["features.2", "features.6", "features.10"]
    w = clf.net.width
    out = stats(torch.rand(5, 3, 32, 32) * 2 - 1)
    assert [tuple(s.shape) for s in out] == [(5, 2 * w), (5, 4 * w), (5, 8 * w)]


def test_channel_stats_are_each_channels_mean_and_std_and_ignore_position():
    from fastinv.train.feature_stats import channel_stats, stats_loss

    feat = torch.zeros(2, 3, 4, 4)
    feat[0, 1, 0, 0] = 4.0  # one hot pixel: mean 4/16, std sqrt(16/16 - 1/16)
    s = channel_stats(feat)
    assert s.shape == (2, 6)
    assert s[0, 1].item() == pytest.approx(0.25)
    assert s[0, 3 + 1].item() == pytest.approx(math.sqrt(1 - 1 / 16), rel=1e-4)
    assert s[1].abs().max().item() < 1e-2  # all-zero map: mean 0, std sqrt(eps)
    moved = torch.roll(feat, shifts=(2, 3), dims=(2, 3))  # the same content elsewhere
    assert torch.allclose(channel_stats(moved), s)
    a, b = [torch.rand(4, 6)], [torch.rand(4, 6)]
    assert stats_loss(a, a).item() == 0.0
    assert stats_loss(a, b).item() > 0
    # relative: scaling both sides by 100 leaves the loss as it was
    assert stats_loss([100 * a[0]], [100 * b[0]]).item() == pytest.approx(stats_loss(a, b).item())
    with pytest.raises(ValueError, match="same, non-zero"):
        stats_loss(a, [])


def test_phi_feature_statistics_hooks_only_record_their_own_calls():
    from fastinv.models.classifiers import load_classifier
    from fastinv.train.feature_stats import PhiStats

    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)
    stats = PhiStats(clf, "features.2,features.10", 16)
    clf(clf.prepare(torch.zeros(2, 3, 16, 16)))  # Φ's other uses (the logits, D) leave no state
    assert stats._out == {}
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    sum(s.sum() for s in stats(x)).backward()
    assert x.grad.abs().sum() > 0  # G's gradient flows through frozen Φ
    with pytest.raises(ValueError, match="not a module"):
        PhiStats(clf, "features.99", 16)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        PhiStats(clf, "fc", 16)(torch.zeros(1, 3, 16, 16))


def test_phi_feature_statistics_trains_and_is_named(tmp_path, synthetic_data):
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--classifier.spec=fastinv:small_cnn",
                                 "--phi_stats_weight=2")
    values = _scalars(run_dir, "phi_stats")
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert inverter_options(cfg) == {"Φ feature statistics": 2.0}
    with pytest.raises(ConfigError, match="phi_stats_weight"):
        load_config("tiny", ["--phi_stats_weight=-1"])
    with pytest.raises(ConfigError, match="phi_stats_layers"):
        load_config("tiny", ["--phi_stats_layers= "])


def test_phi_feature_d_reads_several_maps_and_loads_single_map_state():
    """``d_phi_layer="a,b"``: one SN 1x1 conv per map, each joining after the trunk block of
    its size; a D saved with one map (key ``phi_in.weight_orig``) still loads."""
    from fastinv.models.classifiers import load_classifier
    from fastinv.train.gan import PhiFeatures

    clf = load_classifier("fastinv:small_cnn", random_init=True, num_classes=4)  # 1 block/stage
    phi = PhiFeatures(clf, "features.6,features.10")
    shapes = phi.shapes(32, "cpu")
    assert [s for _, s in shapes] == [16, 8] and phi.layer == "features.6"
    # auto: the deepest map of D's trunk sizes; auto:each: the deepest of each size
    assert PhiFeatures(clf, "auto", 32, (16, 8)).layers == ["features.10"]
    assert PhiFeatures(clf, "auto:each", 32, (16, 8)).layers == ["features.6", "features.10"]
    assert PhiFeatures(clf, "auto:each", 32, (8,)).layers == ["features.10"]
    with pytest.raises(ValueError, match="auto:each: no module"):
        PhiFeatures(clf, "auto:each", 32, (4,))
    chans, sizes = map(list, zip(*shapes))
    torch.manual_seed(0)
    D = Discriminator(4, 32, 4, 0, phi_channels=chans, phi_resolution=sizes)
    assert len(D.phi_in) == 2 and D.phi_blocks == [0, 1]
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    logits, f16, f8 = phi(x)
    out = D(x, logits, f16, f8)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.phi_in.parameters()
               if p.requires_grad)
    with pytest.raises(ValueError, match="reads 2 Φ feature map"):
        D(x, logits, f16)
    # the one-map layout from before several maps: phi_in.* -> phi_in.0.*
    one = Discriminator(4, 32, 4, 0, phi_channels=chans[1], phi_resolution=sizes[1])
    old = {k.replace("phi_in.0.", "phi_in."): v for k, v in one.state_dict().items()}
    assert any(k.startswith("phi_in.weight") for k in old)
    fresh = Discriminator(4, 32, 4, 0, phi_channels=chans[1], phi_resolution=sizes[1])
    fresh.load_state_dict(old)
    for k, v in one.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_mismatched_logits_pairs_other_classes_only():
    from fastinv.train.gan import mismatched_logits

    z = torch.eye(4).repeat(8, 1) * 5  # 32 rows, 4 classes
    other, keep = mismatched_logits(z, torch.Generator().manual_seed(0))
    assert sorted(other.argmax(1).tolist()) == sorted(z.argmax(1).tolist())  # a permutation
    assert torch.equal(keep.bool(), other.argmax(1) != z.argmax(1))
    assert 0 < keep.sum() < len(z)
    _, keep1 = mismatched_logits(z[:1], torch.Generator().manual_seed(0))
    assert keep1.sum() == 0  # a batch of one has no other image


def test_same_class_mismatched_logits_pair_another_image_of_the_class():
    from fastinv.train.gan import mismatched_logits

    z = torch.eye(4)[[0, 0, 0, 1, 1, 2]] * 5 + torch.arange(6.0)[:, None] * 0.01  # class 2 alone
    for seed in range(20):
        other, keep = mismatched_logits(z, torch.Generator().manual_seed(seed), "same_class")
        assert keep.tolist() == [1, 1, 1, 1, 1, 0]
        rows = [int((z == o).all(1).nonzero()) for o in other[:5]]
        assert all(r != i and z[r].argmax() == z[i].argmax() for i, r in enumerate(rows))
    with pytest.raises(ValueError, match="same_class"):
        mismatched_logits(z, torch.Generator(), "nearest")


def test_mismatched_logit_d_trains_and_is_named(tmp_path, synthetic_data):
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--mismatch_weight=1")
    values = _scalars(run_dir, "d_mismatch")
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert inverter_options(cfg) == {"mismatched-logit D": 1.0}
    with pytest.raises(ConfigError, match="mismatch_weight"):
        load_config("tiny", ["--mismatch_weight=-1"])
    with pytest.raises(ConfigError, match="mismatch_pairs"):
        load_config("tiny", ["--mismatch_pairs=nearest"])
    cfg, run_dir = _train_option(tmp_path / "same", synthetic_data, "--mismatch_weight=0.5",
                                 "--mismatch_pairs=same_class")
    assert all(math.isfinite(v) for v in _scalars(run_dir, "d_mismatch"))
    assert inverter_options(cfg) == {"mismatched-logit D": "0.5 (same class)"}


def test_d_logit_head_trains_and_is_named(tmp_path, synthetic_data):
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--d_head_weight=1")
    for tag in ("d_head", "g_head"):
        values = _scalars(run_dir, tag)
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert inverter_options(cfg) == {"D logit head": 1.0}
    with pytest.raises(ConfigError, match="d_head_weight"):
        load_config("tiny", ["--d_head_weight=-1"])
    with pytest.raises(ConfigError, match="d_head_loss"):
        load_config("tiny", ["--d_head_weight=1", "--d_head_loss=l1"])
    D = Discriminator(num_classes=4, resolution=16, ch=4)
    with pytest.raises(ValueError, match="no logit head"):
        D(torch.zeros(2, 3, 16, 16), torch.zeros(2, 4), head=True)
    D = Discriminator(num_classes=4, resolution=16, ch=4, logit_head=True)
    score, pred = D(torch.zeros(2, 3, 16, 16), torch.zeros(2, 4), head=True)
    assert score.shape == (2,) and pred.shape == (2, 4)


def test_d_logit_head_cross_entropy_form(tmp_path, synthetic_data):
    # ACGAN's own loss: the head's outputs are class scores, the target Φ's top-1 class
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--d_head_weight=0.5",
                                 "--d_head_loss=ce", "--d_pool=mean")
    values = _scalars(run_dir, "d_head")
    # with mean pooling (the demo-cpu recipe) a 4-class head starts near log(4) = 1.39
    assert len(values) == 2 and all(0.5 < v < 5 for v in values)
    assert inverter_options(cfg)["D logit head"] == "0.5 (ce)"
    pred = torch.tensor([[2.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    z = torch.tensor([[5.0, 1.0, 0.0, 0.0], [0.0, 9.0, 0.0, 1.0]])
    expected = torch.nn.functional.cross_entropy(pred, torch.tensor([0, 1]))
    torch.testing.assert_close(head_loss(pred, z, "ce", None), expected)


def test_lr_decay_schedule_and_option():
    assert [lr_scale(s, 10, 1.0) for s in (0, 9)] == [1.0, 1.0]
    # from step 5 of 10: 1 before, then 5/5, 4/5, ... 1/5 at the last step
    assert [lr_scale(s, 10, 0.5) for s in range(10)] == pytest.approx(
        [1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])
    assert lr_scale(0, 10, 0.0) == 1.0 and lr_scale(9, 10, 0.0) == pytest.approx(0.1)
    cfg = load_config("tiny", ["--lr_decay_from=0.5", "--classifier.random_init=true"])
    assert inverter_options(cfg) == {"lr decay": "linear from 0.5 of the run"}
    with pytest.raises(ConfigError, match="lr_decay_from"):
        load_config("tiny", ["--lr_decay_from=1.5"])


def test_lr_decay_reaches_the_optimizers(tmp_path, synthetic_data):
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=4", "--lr_decay_from=0.5", "--g_lr=1e-3",
                               "--d_lr=2e-3"])
    trainer = InverterTrainer(cfg, DistInfo())
    seen = []
    for _ in range(4):
        trainer.train_step()
        seen += [trainer.opt_G.param_groups[0]["lr"], trainer.opt_D.param_groups[0]["lr"]]
    assert seen == pytest.approx([1e-3, 2e-3, 1e-3, 2e-3, 1e-3, 2e-3, 5e-4, 1e-3])


def test_mode_seeking_loss_and_option(tmp_path, synthetic_data):
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    ea, eb = torch.zeros(2, 8), torch.full((2, 8), 2.0)
    # image distance 1, noise distance 2: ratio 0.5, loss 1 / 0.5
    assert mode_seeking_loss(a, b, ea, eb).item() == pytest.approx(2.0, rel=1e-4)
    # the same image for both noises: the largest loss, with a gradient that pulls them apart
    a2 = b.clone().requires_grad_(True)
    loss = mode_seeking_loss(a2, b, ea, eb)
    assert loss.item() > 1e4
    loss.backward()
    assert torch.isfinite(a2.grad).all()
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--mode_seeking_weight=0.1")
    values = _scalars(run_dir, "mode_seeking")
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert inverter_options(cfg) == {"mode seeking": 0.1}
    with pytest.raises(ConfigError, match="mode_seeking_weight"):
        load_config("tiny", ["--mode_seeking_weight=-1"])


def test_minibatch_std_sees_a_collapsed_group():
    from fastinv.models.discriminator import minibatch_std

    h = torch.randn(8, 3, 2, 2)
    out = minibatch_std(h, 4)
    assert out.shape == (8, 4, 2, 2) and torch.equal(out[:, :3], h)
    # groups of 4 consecutive images: the first four are one group, the rest another
    first = h[:4].var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
    torch.testing.assert_close(out[:4, 3], first.expand(4, 2, 2))
    # a collapsed group (every image the same) reads ~0, a varied one does not
    same = torch.cat([h[:1].expand(4, 3, 2, 2), h[4:]])
    std = minibatch_std(same, 4)[:, 3, 0, 0]
    assert std[:4].max() < 1e-3 and std[4:].min() > 0.1
    # a batch that is not a multiple of the group: groups of gcd(N, group)
    assert minibatch_std(torch.randn(6, 3, 2, 2), 4)[:, 3].unique().numel() == 3
    assert minibatch_std(torch.randn(1, 3, 2, 2), 4)[:, 3].abs().max() == 0


def test_minibatch_std_option_trains_and_is_named(tmp_path, synthetic_data):
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--d_mbstd=4")
    values = _scalars(run_dir, "loss_d")
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert inverter_options(cfg) == {"minibatch std": 4}
    for bad in ("--d_mbstd=1", "--d_mbstd=3", "--d_mbstd=-2"):  # tiny's batch is 8
        with pytest.raises(ConfigError, match="d_mbstd"):
            load_config("tiny", [bad])
    with pytest.raises(ValueError, match="mbstd_group"):
        Discriminator(num_classes=4, resolution=16, ch=4, mbstd_group=1)
    D = Discriminator(num_classes=4, resolution=16, ch=4, mbstd_group=2)
    assert D.blocks[-1].conv1.weight.shape[1] == 4 * 4 + 1  # the last block reads the std
    assert D(torch.randn(4, 3, 16, 16), torch.randn(4, 4)).shape == (4,)


def test_conditioned_g_input_makes_the_first_map_depend_on_the_logits(tmp_path, synthetic_data):
    from fastinv.models.generator import BOTTOM, Generator

    torch.manual_seed(0)
    G = Generator(num_classes=4, resolution=16, ch=4, noise_dim=12, shared_dim=8,
                  attention_resolution=0, cond_input=True).eval()
    noise = G.sample_noise(2).expand(2, -1).contiguous()  # one noise, two logit vectors
    logits = torch.randn(2, 4)
    first = G.linear(torch.cat([noise.split(G.chunk, 1)[0], G.shared(G.preprocess(logits))], 1))
    assert not torch.allclose(first[0], first[1])  # BigGAN's input (noise only) would be equal
    assert first.shape == (2, 4 * 4 * BOTTOM * BOTTOM)
    plain = Generator(num_classes=4, resolution=16, ch=4, noise_dim=12, shared_dim=8,
                      attention_resolution=0)
    assert G.linear.weight.shape[1] == plain.linear.weight.shape[1] + 8
    # the option trains, is named, and a checkpoint rebuilds the same G
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--g_cond_input=true")
    assert inverter_options(cfg) == {"conditioned G input": True}
    loaded, _ = checkpoint.load_inverter(checkpoint.list_checkpoints(run_dir)[-1], device="cpu")
    assert loaded.cond_input and loaded.config.cond_input


def test_mlp_logit_embedding_is_not_linear_in_the_logits(tmp_path, synthetic_data):
    from fastinv.models.generator import Generator

    torch.manual_seed(0)
    G = Generator(num_classes=4, resolution=16, ch=4, noise_dim=12, shared_dim=8,
                  attention_resolution=0, shared_mlp=True).eval()
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    emb = G.shared(torch.cat([a, b, a + b]))
    # one linear map (BigGAN's, no bias) is additive: e(a + b) = e(a) + e(b); the MLP is not
    assert not torch.allclose(emb[2], emb[0] + emb[1], atol=1e-4)
    plain = Generator(num_classes=4, resolution=16, ch=4, noise_dim=12, shared_dim=8,
                      attention_resolution=0).eval()
    assert sum(p.numel() for p in G.parameters()) == (
        sum(p.numel() for p in plain.parameters()) + 8 * 8 + 8)  # one hidden 8 -> 8 layer
    noise = G.sample_noise(3)
    assert G(torch.randn(3, 4), noise).shape == (3, 3, 16, 16)
    # the option trains, is named, and a checkpoint rebuilds the same G
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--g_shared_mlp=true")
    assert inverter_options(cfg) == {"MLP logit embedding": True}
    loaded, _ = checkpoint.load_inverter(checkpoint.list_checkpoints(run_dir)[-1], device="cpu")
    assert loaded.config.shared_mlp and isinstance(loaded.shared, torch.nn.Sequential)


def test_narrow_full_resolution_blocks_change_only_the_full_resolution_widths(tmp_path,
                                                                           synthetic_data):
    from fastinv.models.generator import Generator

    def widths(net):  # (in, out) channels of every convolution, in module order
        return [tuple(m.weight.shape[1::-1]) for m in net.modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 4]

    kw = dict(num_classes=4, resolution=16, ch=4, noise_dim=12, shared_dim=8,
              attention_resolution=0)
    G, G0 = Generator(**kw, full_res_ch=6), Generator(**kw)
    # at 16 px G has two blocks; the last (8 -> 16 px) and the output layer are the narrow ones
    assert widths(G0) == [(16, 16), (16, 16), (16, 16), (16, 16), (16, 16), (16, 16), (16, 3)]
    assert widths(G) == [(16, 16), (16, 16), (16, 16), (16, 6), (6, 6), (16, 6), (6, 3)]
    assert G.output_bn.num_features == 6
    assert G(torch.randn(3, 4), G.sample_noise(3)).shape == (3, 3, 16, 16)
    dkw = dict(num_classes=4, resolution=16, ch=4, attention_resolution=0, logit_head=True,
               phi_channels=5, phi_resolution=8)  # a Φ map joins after the first block
    D = Discriminator(**dkw, full_res_ch=6)
    assert [tuple(b.conv2.weight.shape[:2]) for b in D.blocks] == [(6, 6), (16, 16), (16, 16)]
    assert D.blocks[1].conv1.weight.shape[1] == 6 and D.phi_in[0].weight.shape[0] == 6
    D0 = Discriminator(**dkw)  # past the block after the first, BigGAN's widths
    assert [widths(b) for b in D.blocks[2:]] == [widths(b) for b in D0.blocks[2:]]
    assert widths(D.blocks[1]) == [(6, 16), (16, 16), (6, 16)]  # conv1, conv2, shortcut
    score, pred = D(torch.randn(3, 3, 16, 16), torch.randn(3, 4), torch.randn(3, 5, 8, 8),
                    head=True)
    assert score.shape == (3,) and pred.shape == (3, 4)
    for make in (lambda: Generator(**kw, full_res_ch=-1),
                 lambda: Discriminator(**dkw, full_res_ch=-1)):
        with pytest.raises(ValueError, match="full_res_ch"):
            make()
    # the option trains, is named, and a checkpoint rebuilds G at its widths
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--g_full_res_ch=6",
                                 "--d_full_res_ch=8")
    assert inverter_options(cfg) == {"narrow full-resolution blocks":
                                     "G 6 channels, D 8 channels"}
    loaded, _ = checkpoint.load_inverter(checkpoint.list_checkpoints(run_dir)[-1], device="cpu")
    assert loaded.config.full_res_ch == 6 and loaded.output_conv.weight.shape[1] == 6
    with pytest.raises(ConfigError, match="g_full_res_ch"):
        load_config("tiny", ["--g_full_res_ch=-2"])


def _conv_inputs(net, run):
    """(in channels, height) of the input of every 2-d convolution ``run()`` calls, in order."""
    seen, hooks = [], [m.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[1:3])))
                       for m in net.modules()
                       if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 4]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_space_to_depth_d_reads_every_pixel_at_half_resolution():
    torch.manual_seed(0)
    dkw = dict(num_classes=4, resolution=16, ch=4, attention_resolution=0, logit_head=True,
               phi_channels=5, phi_resolution=8)  # a Φ map joins after the first block
    D, D0 = Discriminator(**dkw, space_to_depth=True), Discriminator(**dkw)
    x, z, phi = torch.randn(3, 3, 16, 16), torch.randn(3, 4), torch.randn(3, 5, 8, 8)
    # the first block reads the 2 x 2 pixel blocks as 12 channels at 8 px; the trunk keeps
    # BigGAN's sizes, so Φ's map joins after the same block
    assert _conv_inputs(D, lambda: D(x, z, phi))[0] == (12, 8)
    assert max(h for _, h in _conv_inputs(D, lambda: D(x, z, phi))) == 8
    assert _conv_inputs(D0, lambda: D0(x, z, phi))[0] == (3, 16)
    assert D.phi_blocks == D0.phi_blocks == [0]
    block_in = []
    hook = D.blocks[0].register_forward_pre_hook(lambda m, i: block_in.append(i[0]))
    score, pred = D(x, z, phi, head=True)
    hook.remove()
    torch.testing.assert_close(block_in[0], torch.nn.functional.pixel_unshuffle(x, 2))
    assert score.shape == (3,) and pred.shape == (3, 4)
    # every pixel of every image reaches the score (nothing averaged away before D reads it)
    x.requires_grad_(True)
    D(x, z, phi).sum().backward()
    assert (x.grad.abs() > 0).all()


def test_space_to_depth_d_trains_and_is_rebuilt_from_its_checkpoint(tmp_path, synthetic_data):
    cfg, run_dir = _train_option(tmp_path, synthetic_data, "--d_space_to_depth=true")
    assert inverter_options(cfg) == {"space-to-depth D input": True}
    ck = checkpoint.list_checkpoints(run_dir)[-1]
    state = checkpoint.load(ck)
    D = Discriminator(DiscriminatorConfig.from_dict(state["model_config"]["D"]))
    assert D.config.space_to_depth and D.blocks[0].conv1.weight.shape[1] == 12
    D.load_state_dict(state["D"])


def test_detached_d_head_trains_the_head_but_not_the_trunk():
    """With head_detach the head's loss reaches the head's weights and stops at D's pooled
    feature; without it the same loss also moves D's trunk."""
    torch.manual_seed(0)
    D = Discriminator(4, resolution=16, ch=4, attention_resolution=0, logit_head=True)
    x, z = torch.randn(3, 3, 16, 16), torch.randn(3, 4)
    for detach in (True, False):
        D.zero_grad(set_to_none=True)
        _, pred = D(x, z, head=True, head_detach=detach)
        pred.pow(2).sum().backward()
        head_grad = [p.grad for p in D.head.parameters()]
        trunk_grad = [p.grad for p in D.blocks.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in head_grad)
        if detach:  # (the multi-tensor SN op may hand back zero gradients, not None)
            assert all(g is None or g.abs().sum() == 0 for g in trunk_grad)
        else:
            assert any(g is not None and g.abs().sum() > 0 for g in trunk_grad)


def test_detached_d_head_is_named_in_the_run_options():
    cfg = load_config("tiny", ["--d_head_weight=1", "--d_head_detach=true"])
    assert inverter_options(cfg)["D logit head"] == "1, detached"
    cfg = load_config("tiny", ["--d_head_weight=2", "--d_head_loss=ce", "--d_head_detach=true"])
    assert inverter_options(cfg)["D logit head"] == "2 (ce), detached"


@pytest.mark.parametrize("reuse", ["off", "same", "previous"])
def test_reuse_fakes_draws_g_once_per_step_and_feeds_those_images_to_d(tmp_path, synthetic_data,
                                                                       reuse):
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=3", "--mode_seeking_weight=1", f"--reuse_fakes={reuse}"])
    trainer = InverterTrainer(cfg, DistInfo())
    g_out, d_in = [], []
    trainer.G.register_forward_hook(lambda m, args, out: g_out.append(out))
    trainer.D.register_forward_pre_hook(lambda m, args: d_in.append(args[:2]))
    n = cfg.data.batch_size
    last_update = last_logits = None
    for step in range(2):
        g_before = [p.detach().clone() for p in trainer.G.parameters()]
        g_out.clear(), d_in.clear()
        stats = trainer.train_step()
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
        assert stats["mode_seeking"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.G.parameters()))
        # G: one forward (its update's, with gradients) instead of two, except in the first
        # step of "previous", which has no last images yet; D: its update, then G's
        one_draw = reuse == "same" or (reuse == "previous" and step == 1)
        assert len(g_out) == (1 if one_draw else 2) and len(d_in) == 2
        g_update = g_out[-1][:n]  # the images G's update backpropagates through
        assert g_update.requires_grad and torch.equal(d_in[1][0], g_update)
        # D's update sees [reals, fakes] (augmentation is off in tiny) with [z, z_fake]
        (d_images, d_logits), (_, g_logits) = d_in[0], d_in[1]
        if reuse == "same":  # this step's G images and logits
            assert torch.equal(d_images[n:2 * n], g_update.detach())
            assert torch.equal(d_logits[n:], g_logits)
        elif reuse == "previous" and step == 1:  # the last step's, with their own logits
            assert torch.equal(d_images[n:2 * n], last_update.detach())
            assert torch.equal(d_logits[n:], last_logits)
            assert not torch.equal(d_logits[:n], d_logits[n:])
        else:  # a draw of its own (another noise), for this step's logits
            assert not torch.equal(d_images[n:2 * n], g_update.detach())
            assert torch.equal(d_logits[n:], g_logits)
        last_update, last_logits = g_update, g_logits


def test_reuse_fakes_previous_draws_afresh_when_the_batch_size_changed(tmp_path, synthetic_data):
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=2", "--reuse_fakes=previous"])
    trainer = InverterTrainer(cfg, DistInfo())
    trainer.train_step()
    images, logits = trainer._last_fakes
    trainer._last_fakes = (images[:3], logits[:3])  # as after a loader's short last batch
    calls = []
    trainer.G.register_forward_hook(lambda m, args, out: calls.append(len(out)))
    stats = trainer.train_step()
    assert torch.isfinite(stats["loss_d"]) and len(calls) == 2  # its own draw, then G's update
    assert len(trainer._last_fakes[0]) == cfg.data.batch_size


def test_reuse_fakes_previous_resumes_bit_for_bit(tmp_path, synthetic_data):
    """The last step's images travel in the checkpoint: stop + resume == one go."""
    def run(out, steps, *extra):
        cfg = load_config("tiny", [f"--out_dir={out}", f"--root={synthetic_data}",
                                   f"--steps={steps}", "--reuse_fakes=previous",
                                   "--ckpt_every=100", *extra])
        return checkpoint.load(checkpoint.latest_checkpoint(train_inverter(cfg)))

    straight = run(tmp_path / "a", 4)
    stopped = run(tmp_path / "b", 2)
    assert [len(t) for t in stopped["last_fakes"]] == [1, 1]  # one rank's images and logits
    resumed = run(tmp_path / "b", 4, "--resume=true")
    for k in straight["G"]:
        assert torch.equal(straight["G"][k], resumed["G"][k]), k
    for k in straight["D"]:
        assert torch.equal(straight["D"][k], resumed["D"][k]), k


def test_reuse_fakes_previous_seen_gives_d_the_fakes_and_maps_g_was_scored_on(tmp_path,
                                                                               synthetic_data):
    """``previous_seen``: D's fakes are the last G update's images as that update's D saw
    them (the same augmentation) with the D feature network's maps of that forward; the
    feature network then runs on the reals only in D's update."""
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    cfg = load_config("tiny", [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}",
                               "--steps=3", "--reuse_fakes=previous_seen",
                               "--diffaug=translation,cutout", "--d_phi_layer=auto:each",
                               "--class_weight=1", "--mismatch_weight=1"])
    trainer = InverterTrainer(cfg, DistInfo())
    d_in, net_in = [], []
    trainer.D.register_forward_pre_hook(lambda m, args: d_in.append(args))
    trainer.phi.classifier.register_forward_pre_hook(lambda m, args: net_in.append(len(args[0])))
    n = cfg.data.batch_size
    trainer.train_step()  # no last images yet: a draw of its own, augmented with the reals
    # (Φ is D's feature network here: its first call is the batch's logits)
    assert net_in[-2:] == [3 * n, n]  # D's update: reals, fakes, mismatched reals; G's update
    seen, maps = trainer._last_fakes[0], trainer._last_maps
    assert len(seen) == n and len(maps) >= 1 and all(not m.requires_grad for m in maps)
    g_images, g_logits, *g_maps = d_in[1]  # what D read in G's update
    assert torch.equal(seen, g_images.detach())
    assert all(torch.equal(a, b.detach()) for a, b in zip(maps, g_maps))
    d_in.clear(), net_in.clear()
    trainer.train_step()
    assert net_in[-2:] == [2 * n, n]  # D's update: only the reals (and the mismatched reals)
    images, zs, *d_maps = d_in[0]
    assert torch.equal(images[n:2 * n], seen.to(images.dtype))
    assert torch.equal(images[2 * n:], images[:n])  # mismatched: the same augmented reals
    assert torch.equal(zs[n:2 * n], g_logits)
    for m, old in zip(d_maps, maps):
        assert torch.equal(m[n:2 * n], old.to(m.dtype))
        assert torch.equal(m[2 * n:], m[:n])


def test_reuse_fakes_previous_seen_resumes_bit_for_bit(tmp_path, synthetic_data):
    """The last step's augmented images and their maps travel in the checkpoint."""
    def run(out, steps, *extra):
        cfg = load_config("tiny", [f"--out_dir={out}", f"--root={synthetic_data}",
                                   f"--steps={steps}", "--reuse_fakes=previous_seen",
                                   "--diffaug=translation,cutout", "--d_phi_layer=auto:each",
                                   "--ckpt_every=100", *extra])
        return checkpoint.load(checkpoint.latest_checkpoint(train_inverter(cfg)))

    straight = run(tmp_path / "a", 4)
    stopped = run(tmp_path / "b", 2)
    # the augmented images with their logits, and at least one map, one rank each
    assert [len(t) for t in stopped["last_fakes"]] == [1, 1] and len(stopped["last_maps"]) >= 1
    resumed = run(tmp_path / "b", 4, "--resume=true")
    for net in ("G", "D"):
        for k in straight[net]:
            assert torch.equal(straight[net][k], resumed[net][k]), (net, k)


def test_reuse_fakes_needs_one_d_step_and_no_accumulation():
    for bad in (["--d_steps=2"], ["--accumulate=2"]):
        with pytest.raises(ConfigError, match="reuse_fakes"):
            load_config("tiny", ["--reuse_fakes=same", *bad])
    with pytest.raises(ConfigError, match="off, same, previous or previous_seen"):
        load_config("tiny", ["--reuse_fakes=true"])


def test_phi_gradient_to_g_is_scaled_and_named(tmp_path, synthetic_data):
    """``optim.g_phi_grad``: the Φ maps G's update reads through D carry the same values, with
    the gradient to the image multiplied by the scale (0: none); the option is named."""
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    flags = [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}", "--steps=2",
             "--classifier.spec=fastinv:small_cnn", "--d_phi_layer=features.7"]
    trainer = InverterTrainer(load_config("tiny", [*flags, "--g_phi_grad=0.25"]), DistInfo())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    grads, values = {}, {}
    for scale in (1.0, 0.25, 0.0):
        xr = x.clone().requires_grad_(True)
        maps = trainer._phi_of(xr, grad=True, scale=scale)
        values[scale] = [m.detach() for m in maps]
        if scale == 0:
            assert not any(m.requires_grad for m in maps)
            continue
        sum(m.square().sum() for m in maps).backward()
        grads[scale] = xr.grad
    for v in values.values():
        assert all(torch.equal(a, b) for a, b in zip(v, values[1.0]))
    assert grads[1.0].abs().sum() > 0
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0])
    stats = trainer.train_step()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
    assert inverter_options(trainer.cfg)["Φ gradient to G"] == "x0.25"
    # without Φ-feature D there is no Φ gradient to scale: a config error, not a silent no-op
    for bad in (["--g_phi_grad=0"], ["--d_phi_dropout=0.5"], ["--g_phi_grad=1.5"]):
        with pytest.raises(ConfigError, match="g_phi_grad"):
            load_config("tiny", bad)


def test_phi_map_dropout_zeroes_whole_images_maps_and_is_named(tmp_path, synthetic_data):
    """``optim.d_phi_dropout``: in D's training passes each image's Φ maps are either kept as
    they are or zeroed (all maps of that image together), at about the set rate; R1's and
    other passes (no ``drop``) keep them; the option is named and 1 is refused."""
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    flags = [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}", "--steps=2",
             "--classifier.spec=fastinv:small_cnn", "--d_phi_layer=features.7,features.9"]
    trainer = InverterTrainer(load_config("tiny", [*flags, "--d_phi_dropout=0.5"]), DistInfo())
    x = torch.rand(400, 3, 16, 16) * 2 - 1
    full = trainer._phi_of(x, grad=False)
    dropped = trainer._phi_of(x, grad=False, drop=trainer.cfg.optim.d_phi_dropout)
    assert len(full) == len(dropped) == 2
    kept = [torch.equal(dropped[0][i], full[0][i]) for i in range(len(x))]
    for d, f in zip(dropped, full):
        for i in range(len(x)):  # one decision per image, shared by its maps
            assert torch.equal(d[i], f[i]) if kept[i] else not d[i].any()
    assert 0.4 < sum(kept) / len(x) < 0.6
    stats = trainer.train_step()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
    assert inverter_options(trainer.cfg)["Φ-map dropout"] == 0.5
    with pytest.raises(ConfigError, match="d_phi_dropout"):
        load_config("tiny", ["--d_phi_dropout=1", "--d_phi_layer=auto"])


def test_d_feature_network_gives_d_its_maps_and_phi_the_logits(tmp_path, synthetic_data):
    """``classifier.d_net_weights``: D reads the maps of that network (not Φ's) in D's and G's
    passes, gradients to the image run through it, Φ still gives the logits; the option is
    named, a step trains, and it is refused without ``model.d_phi_layer``."""
    from fastinv.models.classifiers import SmallCNN, load_classifier, save_small_resnet
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    torch.manual_seed(5)  # another network than the random-init Φ (seed 0)
    other = save_small_resnet(SmallCNN(10, 16, 1), tmp_path / "other.safetensors", input_size=32,
                              mean=[0.5] * 3, std=[0.5] * 3)
    flags = [f"--out_dir={tmp_path / 'run'}", f"--root={synthetic_data}", "--steps=2",
             "--classifier.spec=fastinv:small_cnn", "--d_phi_layer=features.7"]
    trainer = InverterTrainer(load_config("tiny", [*flags, f"--d_net_weights={other}"]),
                              DistInfo())
    plain = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'p'}"]),
                            DistInfo())
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    maps = trainer._phi_of(x, grad=True)
    net = load_classifier("fastinv:small_cnn", weights=other)
    expect = net.net.features[:8](net.prepare(x.detach()))  # its features.0 ... features.7
    torch.testing.assert_close(maps[0], expect, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain._phi_of(x.detach(), grad=False)[0], maps[0].detach())
    maps[0].square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert trainer.phi.classifier is not trainer.classifier  # Φ itself is untouched
    stats = trainer.train_step()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())
    assert inverter_options(trainer.cfg)["D feature network"] == "other"
    with pytest.raises(ConfigError, match="d_net_weights"):
        load_config("tiny", [f"--d_net_weights={other}"])


def _step_changes_only_g(on, off, stat: str) -> float:
    """One step of two trainers that differ by a term of G's loss: the term is logged (finite)
    by ``on`` only, D's update is the same in both, G's differs. Returns the term's value."""
    s_on, s_off = on.train_step(), off.train_step()
    assert torch.isfinite(torch.as_tensor(s_on[stat])) and stat not in s_off
    torch.testing.assert_close(dict(on.D.named_parameters()), dict(off.D.named_parameters()))
    g_on, g_off = dict(on.G.named_parameters()), dict(off.G.named_parameters())
    assert any(not torch.allclose(g_on[k], g_off[k]) for k in g_on)
    return float(s_on[stat])


def test_feature_network_logit_matching_enters_g_update_only(tmp_path, synthetic_data):
    """``optim.dnet_match_weight``: the D feature network's logits on G's image against its
    logits on the real image whose Φ logits G was given, scaled by their batch variance;
    it changes G's update, not D's (and not the random draws D sees); named; refused
    without ``model.d_phi_layer`` or below 0."""
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    flags = [f"--root={synthetic_data}", "--steps=2", "--d_phi_layer=auto"]
    on = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'on'}",
                                              "--dnet_match_weight=1"]), DistInfo())
    off = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'off'}"]),
                          DistInfo())
    # an untrained G's image is not the real one: the distance is of the order of the spread
    assert _step_changes_only_g(on, off, "dnet_match") > 0.1
    assert torch.equal(on.noise_gen.get_state(), off.noise_gen.get_state())
    assert inverter_options(on.cfg)["feature-network logit matching"] == 1
    with pytest.raises(ConfigError, match="dnet_match_weight"):
        load_config("tiny", ["--dnet_match_weight=1"])
    with pytest.raises(ConfigError, match="dnet_match_weight"):
        load_config("tiny", ["--d_phi_layer=auto", "--dnet_match_weight=-1"])


def test_class_consistency_reads_the_d_feature_network_and_reaches_g(tmp_path, synthetic_data):
    """``optim.class_weight``: the logits of the network whose maps D reads come from the same
    forward as the maps, carry the whole gradient even when G's gradient through the maps is
    scaled to 0, and the cross-entropy against Φ's class of z enters G's update (G's weights
    after a step differ from a run without it, D's do not); named, and refused without
    ``model.d_phi_layer`` or below 0."""
    from fastinv.models.classifiers import SmallCNN, load_classifier, save_small_resnet
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    torch.manual_seed(5)
    other = save_small_resnet(SmallCNN(10, 16, 1), tmp_path / "other.safetensors", input_size=32,
                              mean=[0.5] * 3, std=[0.5] * 3)
    flags = [f"--root={synthetic_data}", "--steps=2", "--classifier.spec=fastinv:small_cnn",
             "--d_phi_layer=features.7", f"--d_net_weights={other}"]
    on = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'on'}",
                                              "--class_weight=2", "--g_phi_grad=0"]), DistInfo())
    off = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'off'}",
                                               "--g_phi_grad=0"]), DistInfo())
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    net_logits, maps = on._phi_of(x, grad=True, scale=0.0, logits=True)
    net = load_classifier("fastinv:small_cnn", weights=other)
    torch.testing.assert_close(net_logits, net(net.prepare(x.detach())), rtol=1e-4, atol=1e-5)
    assert not maps[0].requires_grad  # scale 0: no gradient through the maps ...
    net_logits.sum().backward()
    assert x.grad.abs().sum() > 0  # ... but the logits carry theirs
    assert _step_changes_only_g(on, off, "class") > 0
    assert inverter_options(on.cfg)["class consistency"] == 2
    with pytest.raises(ConfigError, match="class_weight"):
        load_config("tiny", ["--class_weight=1"])
    with pytest.raises(ConfigError, match="class_weight"):
        load_config("tiny", ["--d_phi_layer=features.7", "--class_weight=-1"])


def test_within_class_head_targets_the_logits_beyond_the_class(tmp_path, synthetic_data):
    """``optim.d_head_within_weight``: the D logit head gets num_classes more outputs that
    regress each logit's deviation from its Φ class's mean over that class's std; the class
    statistics are fitted on the training logits (deviations of mean 0, std 1 per class there)
    and travel in D's state; the term enters D's and G's head losses; named; refused without
    the head or below 0."""
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    D = Discriminator(num_classes=3, resolution=16, ch=4, logit_head=True, head_within=True,
                      logit_preprocess="affine")
    mean, std = torch.randn(3, 3), torch.rand(3, 3) + 0.5
    D.preprocess.set_statistics(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 1.0, 4.0]))
    D.set_class_statistics(mean, std)
    z = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    pre = D.preprocess(z)
    torch.testing.assert_close(D.within_class(z), torch.stack(
        [(pre[0] - mean[0]) / std[0], (pre[1] - mean[2]) / std[2]]))
    score, pred = D(torch.zeros(2, 3, 16, 16), z, head=True)
    assert score.shape == (2,) and pred.shape == (2, 6)
    expected = (pred[:, :3] - pre).pow(2).mean() + 0.5 * (pred[:, 3:] - D.within_class(z)).pow(2).mean()
    torch.testing.assert_close(head_loss(pred, z, "mse", D.preprocess, D.within_class, 0.5),
                               expected)
    with pytest.raises(ValueError, match="logit_head"):
        Discriminator(num_classes=3, resolution=16, ch=4, head_within=True)
    with pytest.raises(ValueError, match="within-class head"):
        Discriminator(num_classes=3, resolution=16, ch=4, logit_head=True).set_class_statistics(
            mean, std)

    flags = [f"--root={synthetic_data}", "--steps=2", "--logit_preprocess=affine",
             "--d_head_weight=1"]
    on = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'on'}",
                                              "--d_head_within_weight=2"]), DistInfo())
    z = on._training_logits(4096)
    dev = on.D.within_class(z)
    for c in z.argmax(1).unique():
        rows = dev[z.argmax(1) == c]
        if len(rows) >= 2:
            torch.testing.assert_close(rows.mean(0), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
            torch.testing.assert_close(rows.std(0, unbiased=False), torch.ones(z.shape[1]),
                                       atol=1e-3, rtol=0)
    assert {"class_mean", "class_std"} <= set(on.D.state_dict())
    off = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path / 'off'}"]),
                          DistInfo())
    s_on, s_off = on.train_step(), off.train_step()
    # the same head on its first outputs: the within-class term is what the losses add
    assert s_on["d_head"] > s_off["d_head"] and s_on["g_head"] > s_off["g_head"]
    assert inverter_options(on.cfg)["within-class head"] == 2
    with pytest.raises(ConfigError, match="d_head_within_weight"):
        load_config("tiny", ["--d_head_within_weight=1"])
    with pytest.raises(ConfigError, match="d_head_within_weight"):
        load_config("tiny", ["--d_head_weight=1", "--d_head_within_weight=-1"])


def test_cutout_p_cuts_some_images_and_the_within_term_reads_the_whole_ones(tmp_path,
                                                                             synthetic_data):
    """``optim.cutout_p``: each image gets diffaug's cutout with that probability (1: every
    image, and the same draws as before), ``diff_augment_whole`` says which were left whole,
    and the within-class head's term averages over those alone (0, still in the graph, when
    there are none); refused out of (0, 1], without a cutout policy or the within-class head."""
    from fastinv.train.augment import cutout, diff_augment_whole
    from fastinv.train.distributed import DistInfo
    from fastinv.train.gan import InverterTrainer

    x = torch.ones(400, 1, 16, 16)
    every, whole = diff_augment_whole(x, ("cutout",), torch.Generator().manual_seed(3))
    assert not whole.any()
    torch.testing.assert_close(every, cutout(x, gen=torch.Generator().manual_seed(3)),
                               rtol=0, atol=0)
    seen, whole = diff_augment_whole(x, ("small_cutout",), torch.Generator().manual_seed(3),
                                     cutout_p=0.5)
    assert torch.equal((seen == 0).flatten(1).any(1), ~whole)  # a hole in every cut image only
    assert 0.4 < whole.float().mean() < 0.6
    seen, whole = diff_augment_whole(x, ("translation", "cutout"),
                                     torch.Generator().manual_seed(3), cutout_p=0.5)
    translated = diff_augment(x, ("translation",), torch.Generator().manual_seed(3))
    assert torch.equal(seen[whole], translated[whole])  # whole: the other transforms alone

    c = 3
    pred, z = torch.randn(4, 2 * c, requires_grad=True), torch.randn(4, c)
    within = torch.randn(4, c)
    rows = torch.tensor([True, False, True, False])
    got = head_loss(pred, z, "mse", lambda t: t, lambda t: within, 2.0, within_rows=rows)
    want = ((pred[:, :c] - z).pow(2).mean()
            + 2.0 * (pred[rows, c:] - within[rows]).pow(2).mean())
    torch.testing.assert_close(got, want)
    none = head_loss(pred, z, "mse", lambda t: t, lambda t: within, 2.0,
                     within_rows=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(none, (pred[:, :c] - z).pow(2).mean())
    none.backward()
    assert pred.grad is not None and torch.equal(pred.grad[:, c:], torch.zeros(4, c))

    flags = [f"--root={synthetic_data}", "--steps=2", "--logit_preprocess=affine",
             "--d_head_weight=1", "--d_head_within_weight=1", "--diffaug=translation,cutout"]
    trainer = InverterTrainer(load_config("tiny", [*flags, f"--out_dir={tmp_path}",
                                                   "--cutout_p=0.5"]), DistInfo())
    stats = trainer.train_step()
    assert torch.isfinite(torch.as_tensor(stats["d_head"])) and stats["g_head"] > 0
    assert inverter_options(trainer.cfg)["within-class head on whole images"] == "cutout p 0.5"
    for bad, match in ((["--cutout_p=0"], "cutout_p must be in"),
                       (["--cutout_p=1.5"], "cutout_p must be in"),
                       (["--d_head_weight=1", "--d_head_within_weight=1", "--diffaug=translation",
                         "--cutout_p=0.5"], "needs a cutout"),
                       (["--diffaug=cutout", "--cutout_p=0.5"], "within-class head")):
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", bad)
