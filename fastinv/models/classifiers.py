"""The classifier zoo: a frozen classifier ``Φ`` whose logits fastinv inverts.

``load_classifier(spec, weights=PATH)`` with ``spec`` one of

    torchvision:<name>   torchvision architectures (resnet50, resnet152, inception_v3, ...)
    timm:<name>          timm architectures (when timm is installed)
    robust:<arch>        checkpoints in the format of the ``robustness`` library (Madry lab's
                         adversarially trained ImageNet ResNets): ``module.model.`` prefixes
                         stripped, attacker copy ignored, the normalizer's mean/std used
    torchscript:<path>   a TorchScript file (optional sidecar ``<path>.json`` with input_size,
                         mean, std, num_classes); TorchScript is a program, not just tensors:
                         load only files you trust
    fastinv:small_resnet the project's small ResNet, as saved by ``fastinv classifier train``
                         (``.safetensors`` + ``.json`` sidecar with arch, classes, normalisation)
    fastinv:small_cnn    the plain VGG-style CNN the demo trains as its evaluation judge

Weights come only from local files (nothing is downloaded); tensors are read with safetensors
or ``torch.load(weights_only=True)``, so a weights checkpoint cannot run code. The result is frozen:
eval mode for good, no parameter requires grad.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastinv.models.fold import fold_batch_norms
from fastinv.models.small_cnn import SmallCNN
from fastinv.models.small_resnet import SmallResNet

# the project's own architectures, by the name in a spec (fastinv:<name>) and in the sidecar
FASTINV_ARCHS = {"small_resnet": SmallResNet, "small_cnn": SmallCNN}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPEC_KINDS = ("torchvision", "timm", "robust", "torchscript", "fastinv")


def classifier_input(images: torch.Tensor, input_size: int, mean, std) -> torch.Tensor:
    """The one mapping from images in [-1, 1] (G's range) to a classifier's input: [0, 1],
    resized to ``input_size`` (bilinear, antialiased) when needed, normalised by ``mean`` /
    ``std`` (per channel; sequences or tensors). Differentiable in ``images``."""
    x = (images.float() + 1) / 2
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear",
                          align_corners=False, antialias=True)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def fast_layout(device: torch.device | str) -> torch.memory_format:
    """The memory format a CNN classifier runs fastest in on ``device``: channels_last on CPU
    (oneDNN's native layout; ATen's pooling is vectorised over channels only there), the
    default elsewhere."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


class Classifier(nn.Module):
    """A frozen classifier: normalised images ``(N, 3, input_size, input_size)`` -> logits.

    ``prepare(images)`` turns images in [-1, 1] of any size (G's output) into its input."""

    def __init__(self, net: nn.Module, *, name: str, input_size: int, mean, std, num_classes: int):
        super().__init__()
        self.net, self.name = net, name
        self.input_size, self.num_classes = int(input_size), int(num_classes)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        self._layout: torch.memory_format | None = None  # None: the input's own

    def train(self, mode: bool = True) -> Classifier:
        return super().train(False)  # frozen: batch norm statistics never move

    def channels_last(self, on: bool = True) -> Classifier:
        """Run in channels_last (weights and every input), or back to the input's own layout.
        On CPU it is oneDNN's native layout and ATen's pooling kernels are vectorised over
        channels only there: SmallCNN's features on 32 images of 32 px, bf16, one thread, take
        3.1 ms forward / 8.6 ms forward+backward against 7.8 / 15.4 in NCHW, where max pooling
        alone cost 2.4 ms a call (RESULTS.md, issue 11)."""
        self._layout = torch.channels_last if on else None
        self.net.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        return self

    def place(self, device: torch.device | str) -> Classifier:
        """Moved to ``device``, in the layout it runs fastest there: channels_last on CPU
        (``channels_last``), the input's own elsewhere."""
        self.to(device)
        return self.channels_last(fast_layout(device) == torch.channels_last)

    def fold_batch_norm(self, keep=()) -> list[str]:
        """Every batch norm that follows a convolution folded into it, in place
        (fastinv.models.fold): the same outputs to rounding, one op less each way per pair.
        ``keep``: convolutions whose own output is read (a tap by name) stay unfolded.
        Returns the folded convolutions' names."""
        return fold_batch_norms(self.net, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._layout is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self._layout)
        return self.net(x)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised classifier input at ``input_size`` (differentiable)."""
        return classifier_input(images, self.input_size, self._mean, self._std)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, input_size={self.input_size}, "
                f"num_classes={self.num_classes}")


def _weights_path(weights, spec: str) -> Path:
    if weights is None:
        raise ValueError(f"classifier {spec!r} needs local weights: pass --weights PATH (nothing "
                         "is downloaded), or --random-init for tests")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights for {spec!r} not found at {path}; pass an "
                                "existing file with --weights PATH")
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint without running pickled code (safetensors or weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read {path} as a weights-only checkpoint ({exc}); save a plain "
                         "state dict (torch.save(model.state_dict(), ...)) or a .safetensors file"
                         ) from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _torchvision_net(arch: str, num_classes: int) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError("torchvision classifiers need torchvision: pip install torchvision") from exc
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision classifier {arch!r}; see "
                         "torchvision.models.list_models() for the names")
    if arch == "inception_v3":
        # transform_input: the released weights expect ImageNet-normalised input converted inside
        return torchvision.models.inception_v3(weights=None, num_classes=num_classes,
                                               aux_logits=True, init_weights=False,
                                               transform_input=True)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _load_into(net: nn.Module, sd: dict, spec: str, path: Path) -> None:
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not fit {spec!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; check the architecture name")


def _torchvision(arch, weights, random_init, num_classes):
    spec = f"torchvision:{arch}"
    net = _torchvision_net(arch, num_classes or 1000)
    if not random_init:
        path = _weights_path(weights, spec)
        _load_into(net, load_state_dict(path), spec, path)
    if arch == "inception_v3":
        net.aux_logits, net.AuxLogits = False, None
    size = 299 if arch == "inception_v3" else 224
    return Classifier(net, name=spec, input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      num_classes=num_classes or 1000)


def _timm(arch, weights, random_init, num_classes):
    try:
        import timm
    except ImportError as exc:
        raise ImportError("timm classifiers need timm: pip install timm") from exc
    spec = f"timm:{arch}"
    kwargs = {"num_classes": num_classes} if num_classes else {}
    net = timm.create_model(arch, pretrained=False, **kwargs)
    if not random_init:
        path = _weights_path(weights, spec)
        _load_into(net, load_state_dict(path), spec, path)
    cfg = timm.data.resolve_data_config({}, model=net)
    return Classifier(net, name=spec, input_size=cfg["input_size"][-1], mean=cfg["mean"],
                      std=cfg["std"], num_classes=net.num_classes)


def _robust(arch, weights, random_init, num_classes):
    spec = f"robust:{arch}"
    net = _torchvision_net(arch, num_classes or 1000)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if not random_init:
        path = _weights_path(weights, spec)
        sd = load_state_dict(path)
        for prefix in ("module.model.", "model.", ""):
            model_sd = _strip(sd, prefix)
            if model_sd and not any(k.startswith(("attacker.", "normalizer.", "model."))
                                    for k in model_sd):
                break
        norm = _strip(sd, "module.normalizer.") or _strip(sd, "normalizer.")
        if "new_mean" in norm and "new_std" in norm:
            mean, std = norm["new_mean"].flatten().tolist(), norm["new_std"].flatten().tolist()
        _load_into(net, model_sd, spec, path)
    return Classifier(net, name=spec, input_size=224, mean=mean, std=std,
                      num_classes=num_classes or 1000)


def _torchscript(path, weights, random_init, num_classes):
    spec = f"torchscript:{path}"
    file = _weights_path(path, spec)
    net = torch.jit.load(str(file), map_location="cpu")
    meta_path = file.with_name(file.name + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    size = int(meta.get("input_size", 224))
    if num_classes is None:
        num_classes = meta.get("num_classes")
    if num_classes is None:
        with torch.no_grad():
            num_classes = net.eval()(torch.zeros(1, 3, size, size)).shape[-1]
    return Classifier(net, name=spec, input_size=size, mean=meta.get("mean", IMAGENET_MEAN),
                      std=meta.get("std", IMAGENET_STD), num_classes=num_classes)


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_small_resnet(model: SmallResNet | SmallCNN, path: str | Path, *, input_size: int, mean,
                      std, extra: dict | None = None) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically."""
    from fastinv.io import atomic_save_safetensors, atomic_write_json

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = next(k for k, cls in FASTINV_ARCHS.items() if type(model) is cls)
    meta = dict(arch=arch, num_classes=model.num_classes, width=model.width,
                blocks_per_stage=model.blocks_per_stage, input_size=int(input_size),
                mean=list(mean), std=list(std), **(extra or {}))
    atomic_save_safetensors(model.state_dict(), path)
    atomic_write_json(sidecar_path(path), meta)
    return path


def _fastinv(arch, weights, random_init, num_classes):
    spec = f"fastinv:{arch}"
    if arch not in FASTINV_ARCHS:
        raise ValueError(f"unknown fastinv classifier {arch!r}; built in: {sorted(FASTINV_ARCHS)}")
    cls = FASTINV_ARCHS[arch]
    if random_init:
        meta = dict(num_classes=num_classes or 10, width=16, blocks_per_stage=1, input_size=32,
                    mean=[0.5] * 3, std=[0.5] * 3)
        net = cls(meta["num_classes"], meta["width"], meta["blocks_per_stage"])
    else:
        path = _weights_path(weights, spec)
        side = sidecar_path(path)
        if not side.is_file():
            raise FileNotFoundError(f"{side} (the metadata next to {path.name}) is missing; "
                                    f"{spec} weights come from `fastinv classifier train`")
        meta = json.loads(side.read_text())
        if meta.get("arch", "small_resnet") != arch:
            raise ValueError(f"{path} holds a fastinv:{meta['arch']} classifier, not {spec}; "
                             f"pass --classifier fastinv:{meta['arch']}")
        if num_classes is not None and num_classes != meta["num_classes"]:
            raise ValueError(f"{path} has {meta['num_classes']} classes, asked for {num_classes}")
        net = cls(meta["num_classes"], meta["width"], meta["blocks_per_stage"])
        _load_into(net, load_state_dict(path), spec, path)
    return Classifier(net, name=spec, input_size=meta["input_size"], mean=meta["mean"],
                      std=meta["std"], num_classes=meta["num_classes"])


_LOADERS = {"torchvision": _torchvision, "timm": _timm, "robust": _robust,
            "torchscript": _torchscript, "fastinv": _fastinv}


def load_classifier(spec: str, weights: str | Path | None = None, random_init: bool = False,
                    num_classes: int | None = None) -> Classifier:
    """A frozen, eval-mode classifier from ``spec`` (see the module docstring)."""
    kind, sep, name = spec.partition(":")
    if not sep or kind not in _LOADERS or not name:
        raise ValueError(f"classifier spec {spec!r} must look like <kind>:<name> with kind one of "
                         f"{SPEC_KINDS}, e.g. torchvision:resnet50 or fastinv:small_resnet")
    return _LOADERS[kind](name, weights, random_init, num_classes)
