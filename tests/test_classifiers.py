"""The classifier zoo (local weights only, frozen) and the small ResNet's standard / PGD training."""

from __future__ import annotations

import json

import pytest
import torch

from fastinv.models.classifiers import Classifier, load_classifier, save_small_resnet
from fastinv.models.small_resnet import SmallResNet
from fastinv.train.classifier import (
    ClassifierConfig,
    pgd_attack,
    symmetry_augment,
    train_classifier,
)
from tests.train_tiny import tiny_dataset


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def _same_outputs(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_torchvision_from_saved_state_dict(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    clf = load_classifier("torchvision:resnet18", weights=tmp_path / "r18.pth", num_classes=7)
    assert (clf.input_size, clf.num_classes) == (224, 7)
    assert clf.mean == pytest.approx((0.485, 0.456, 0.406))
    _same_outputs(net, clf)


def test_robustness_format_checkpoint(tmp_path):
    """Madry lab's `robustness` checkpoints: model under module.model., an attacker copy under
    module.attacker.model., the normalizer's mean/std under module.normalizer."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=5).eval()
    sd = {}
    for k, v in net.state_dict().items():
        sd["module.model." + k] = v
        sd["module.attacker.model." + k] = v.clone()
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    sd["module.normalizer.new_mean"], sd["module.normalizer.new_std"] = mean, std
    sd["module.attacker.normalize.new_mean"] = mean
    torch.save({"model": sd, "epoch": 90, "schedule": None}, tmp_path / "robust.pt")
    clf = load_classifier("robust:resnet18", weights=tmp_path / "robust.pt", num_classes=5)
    assert clf.mean == pytest.approx((0.4, 0.5, 0.6)) and clf.std == pytest.approx((0.2, 0.25, 0.3))
    _same_outputs(net, clf)


def test_missing_weights_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights PATH"):
        load_classifier("torchvision:resnet18", weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="--weights PATH"):
        load_classifier("robust:resnet50")
    with pytest.raises(ValueError, match="kind:name|<kind>:<name>"):
        load_classifier("resnet50")
    with pytest.raises(ValueError, match="unknown torchvision classifier"):
        load_classifier("torchvision:resnet_does_not_exist", random_init=True)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_classifier("torchvision:resnet18", weights=tmp_path / "evil.pt")


def test_mismatched_weights_are_a_clear_error(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "r.pth")
    with pytest.raises(ValueError, match="do not fit"):
        load_classifier("torchvision:resnet34", weights=tmp_path / "r.pth", num_classes=3)


def test_classifier_is_frozen_and_gets_no_gradient():
    clf = load_classifier("fastinv:small_resnet", random_init=True, num_classes=4)
    clf.train()
    assert not clf.training and not clf.net.training
    assert all(not p.requires_grad for p in clf.parameters())
    x = torch.rand(2, 3, 16, 16, requires_grad=True) * 2 - 1
    x.retain_grad()
    clf(clf.prepare(x)).sum().backward()
    assert x.grad is not None  # gradients reach the input (aux loss), never the weights
    assert all(p.grad is None for p in clf.parameters())


def test_channels_last_gives_the_same_logits_features_and_gradients():
    """``Classifier.place("cpu")`` runs Φ in channels_last (the faster layout on CPU): the
    same logits, tapped maps and input gradient as NCHW, in float64 to rounding."""
    from fastinv.models.small_cnn import SmallCNN

    torch.manual_seed(0)
    clf = Classifier(SmallCNN(10, width=8, blocks_per_stage=1).double(), name="t",
                     input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10)
    x = torch.randn(5, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    ref = clf(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert clf.place("cpu") is clf and clf._layout is torch.channels_last
    conv = clf.net.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = clf(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
    clf.channels_last(False)  # back to the input's own layout, weights contiguous again
    assert clf._layout is None and clf.net.features[0].weight.is_contiguous()
    torch.testing.assert_close(clf(x), ref)


def test_prepare_resizes_and_normalises():
    clf = load_classifier("fastinv:small_resnet", random_init=True)
    out = clf.prepare(torch.zeros(1, 3, 16, 16))  # grey 0.5 at [0, 1], mean 0.5 -> 0
    assert out.shape == (1, 3, 32, 32) and out.abs().max() < 1e-6


def test_timm_and_torchscript_specs(tmp_path):
    clf = load_classifier("timm:resnet18", random_init=True, num_classes=3)
    assert isinstance(clf, Classifier) and clf.num_classes == 3 and clf.input_size == 224
    net = SmallResNet(6, width=4, blocks_per_stage=1).eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    (tmp_path / "net.pt.json").write_text(json.dumps({"input_size": 32, "mean": [0.5] * 3,
                                                      "std": [0.5] * 3}))
    ts = load_classifier(f"torchscript:{tmp_path / 'net.pt'}")
    assert (ts.input_size, ts.num_classes) == (32, 6)
    _same_outputs(net, ts, size=32)


def test_small_resnet_roundtrip_with_sidecar(tmp_path):
    net = SmallResNet(4, width=4, blocks_per_stage=1).eval()
    path = save_small_resnet(net, tmp_path / "clf", input_size=32, mean=(0.1, 0.2, 0.3),
                             std=(0.5, 0.5, 0.5))
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    clf = load_classifier("fastinv:small_resnet", weights=path)
    assert clf.mean == pytest.approx((0.1, 0.2, 0.3)) and clf.num_classes == 4
    _same_outputs(net, clf, size=32)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata"):
        load_classifier("fastinv:small_resnet", weights=path)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_the_ball_and_raises_the_loss(norm, eps):
    torch.manual_seed(0)
    net = SmallResNet(3, width=4, blocks_per_stage=1).eval()
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    adv = pgd_attack(net, x, y, norm=norm, eps=eps, steps=5, step_size=2.5 * eps / 5,
                     normalize=lambda t: (t - 0.5) / 0.5)
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(net((adv - 0.5) / 0.5), y) > ce(net((x - 0.5) / 0.5), y)


@pytest.mark.parametrize("adversarial,optimizer,augment", [
    ("none", "sgd", "none"), ("linf", "sgd", "none"), ("l2", "adamw", "dihedral+rgb")])
def test_train_classifier_writes_loadable_weights(tmp_path, synthetic_data, adversarial,
                                                  optimizer, augment):
    cfg = ClassifierConfig(data=str(synthetic_data), out=str(tmp_path / "clf.safetensors"),
                           width=4, blocks_per_stage=1, epochs=1, batch_size=8, workers=0,
                           device="cpu", backend="pil", adversarial=adversarial, eps=8 / 255,
                           pgd_steps=2, optimizer=optimizer, lr=1e-3 if optimizer == "adamw"
                           else 0.1, crop_min_scale=1.0, symmetry_augment=augment)
    path = train_classifier(cfg)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["arch"] == "small_resnet" and meta["training"]["adversarial"] == adversarial
    assert 0 <= meta["val_accuracy"] <= 1
    assert ("val_robust_accuracy" in meta) == (adversarial != "none")
    clf = load_classifier("fastinv:small_resnet", weights=path)
    assert clf.num_classes == meta["num_classes"] == len(meta["classes"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_train_classifier_steps_its_optimizer_fused(tmp_path, synthetic_data, monkeypatch,
                                                    optimizer):
    # one kernel for all parameters on CPU (fastinv.train.optim.fused), as the inverter's Adam
    made = []
    for name in ("AdamW", "SGD"):
        cls = getattr(torch.optim, name)

        def record(*args, _cls=cls, **kwargs):
            made.append(_cls(*args, **kwargs))
            return made[-1]

        monkeypatch.setattr(torch.optim, name, record)
    cfg = ClassifierConfig(data=str(synthetic_data), out=str(tmp_path / "clf.safetensors"),
                           width=4, blocks_per_stage=1, max_steps=2, batch_size=8, workers=0,
                           device="cpu", backend="pil", optimizer=optimizer)
    train_classifier(cfg)
    assert len(made) == 1 and made[0].defaults["fused"] is True


def test_classifier_config_errors():
    with pytest.raises(ValueError, match="--data DIR"):
        train_classifier(ClassifierConfig())
    with pytest.raises(ValueError, match="adversarial must be one of"):
        ClassifierConfig(data="x", adversarial="l1").validate()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ClassifierConfig(data="x", optimizer="adam").validate()
    with pytest.raises(ValueError, match="symmetry_augment must be one of"):
        ClassifierConfig(data="x", symmetry_augment="rot").validate()
    with pytest.raises(ValueError, match="crop_min_scale must be in"):
        ClassifierConfig(data="x", crop_min_scale=0.0).validate()


def test_symmetry_augment_only_rotates_flips_and_reorders_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 5, 5)
    assert symmetry_augment(x, "none", g) is x
    d4 = symmetry_augment(x, "dihedral", g)
    for a, b in zip(x, d4):  # each image is one of the 8 rotations / reflections of itself
        views = [torch.rot90(v, k, dims=(1, 2)) for v in (a, a.flip(2)) for k in range(4)]
        assert any(torch.equal(b, v) for v in views)
    assert not torch.equal(d4, x)
    rgb = symmetry_augment(x, "dihedral+rgb", g)
    torch.testing.assert_close(rgb.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    torch.testing.assert_close(rgb.sum(dim=(2, 3)).sort(1).values,
                               x.sum(dim=(2, 3)).sort(1).values)


def test_classifier_cli_show_and_errors(capsys):
    import argparse

    from fastinv.train import classifier_cli as cli

    parser = argparse.ArgumentParser()
    cli.register(parser)
    args = parser.parse_args(["show", "fastinv:small_resnet", "--random-init", "--num-classes", "3"])
    assert cli.run(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["num_classes"] == 3 and shown["input_size"] == 32
    assert cli.run(parser.parse_args(["show", "torchvision:resnet18"])) == 2
    assert "--weights PATH" in capsys.readouterr().err


def test_train_classifier_starts_from_init_weights(tmp_path, synthetic_data):
    from safetensors.torch import load_file

    classes = [d for d in (synthetic_data / "train").iterdir() if d.is_dir()]
    init = SmallResNet(len(classes), width=4, blocks_per_stage=1)
    init_path = save_small_resnet(init, tmp_path / "init.safetensors", input_size=32,
                                  mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = ClassifierConfig(data=str(synthetic_data), out=str(tmp_path / "clf.safetensors"),
                           width=4, blocks_per_stage=1, max_steps=0, workers=0, device="cpu",
                           backend="pil", init_weights=str(init_path))
    out = load_file(str(train_classifier(cfg)))
    for k, v in init.state_dict().items():
        torch.testing.assert_close(out[k], v)


def test_classifier_train_takes_the_override_syntax_of_fastinv_train(capsys):
    from fastinv import cli

    assert cli.main(["classifier", "train", "--data=/some/dir", "--batch-size=8",
                     "--max_steps=3", "--mean=0.4,0.5,0.6", "--adversarial=l2",
                     "--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["data"] == "/some/dir" and shown["batch_size"] == 8 and shown["max_steps"] == 3
    assert shown["mean"] == [0.4, 0.5, 0.6] and shown["adversarial"] == "l2"
    assert cli.main(["classifier", "train", "--no_such_key=1"]) == 2
    assert "unknown key 'no_such_key'" in capsys.readouterr().err
    assert cli.main(["classifier", "train", "--epochs=many"]) == 2
    assert "epochs must be an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without overrides still refuses extras
        cli.main(["info", "--bogus=1"])


def test_small_resnet_shortcut_is_a_strided_1x1_convolution():
    # the projection shortcut subsamples, then convolves at stride 1 (a stride-2 1x1
    # convolution's oneDNN AVX2 backward corrupts the heap for < 8 input channels in
    # channels_last): the same map as the stride-2 convolution, in float64
    from fastinv.models.small_resnet import BasicBlock

    block = BasicBlock(4, 8, stride=2).double().eval()
    x = torch.randn(3, 4, 15, 15, dtype=torch.float64)
    conv, bn = block.shortcut
    want = bn(torch.nn.functional.conv2d(x, conv.weight, stride=2))
    got = bn(conv(x[:, :, ::2, ::2]))
    torch.testing.assert_close(got, want)
    out = block(x)
    assert out.shape == (3, 8, 8, 8)  # conv1's stride-2 output size, odd input too
    # forward + backward in channels_last with every thread count the tests use: completes
    net = SmallResNet(3, width=4, blocks_per_stage=1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    net(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())
