"""What a reconstruction x̂ keeps of x: classifier agreement, logit consistency, pixel fidelity.

Images are in [-1, 1] (the generator's range) unless a function says otherwise. The classifier
is a frozen module with ``input_size``, ``mean``, ``std`` (see ``fastinv.models.classifiers``);
``classifier_logits`` is the one place where generator images become classifier inputs, so the
inverter, the baselines and the metrics all see the classifier the same way.

PSNR and SSIM are torchmetrics' definitions, computed here: PSNR per image as
``-10 log10(MSE)`` on [0, 1] images, SSIM (11x11 Gaussian window, σ 1.5, reflect padding) as two
small matrix products per image (``ssim``), 7x faster on CPU; both equal torchmetrics' in
float64 (tests/test_metrics.py). torchmetrics is imported only for LPIPS / FID: importing it
pulls in torchvision and scipy, 3 s of every process that scores an image (every demo worker).
LPIPS and FID need backbone weights that fastinv never downloads: they are computed only when
the user passes local weight files, and otherwise reported as ``"not computed"`` with what to
pass.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fastinv.models.classifiers import classifier_input

NOT_COMPUTED = "not computed"


def to_classifier_input(images: torch.Tensor, classifier: torch.nn.Module) -> torch.Tensor:
    """Map images in [-1, 1] to the classifier's normalised input at its input size: the same
    mapping as ``Classifier.prepare`` (one function, ``classifier_input``), for any module with
    ``mean`` / ``std`` (and ``input_size``, else the images' own size)."""
    size = int(getattr(classifier, "input_size", images.shape[-1]))
    return classifier_input(images, size, classifier.mean, classifier.std)


def classifier_logits(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits Φ(x) of images in [-1, 1]; differentiable in ``images`` (used by the baselines)."""
    return classifier(to_classifier_input(images, classifier)).float()


def _topk_hit(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float()


def classifier_agreement(
    logits_rec: torch.Tensor, logits_orig: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """Top-1/top-5 of Φ(x̂) against Φ(x)'s top-1 prediction and against the true label.

    ``top1_vs_orig`` = 1 means every reconstruction is classified as its original was;
    top-5 is capped at the number of classes (with 4 classes, top-5 is trivially 1).
    """
    pred = logits_orig.argmax(dim=1)
    out = {
        "top1_vs_orig": _topk_hit(logits_rec, pred, 1).mean().item(),
        "top5_vs_orig": _topk_hit(logits_rec, pred, 5).mean().item(),
    }
    if labels is not None:
        labels = labels.to(logits_rec.device)
        out["top1_vs_label"] = _topk_hit(logits_rec, labels, 1).mean().item()
        out["top5_vs_label"] = _topk_hit(logits_rec, labels, 5).mean().item()
        out["orig_top1_vs_label"] = _topk_hit(logits_orig, labels, 1).mean().item()
    return out


def logit_consistency(logits_rec: torch.Tensor, logits_orig: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and relative L2 ‖Φ(x̂) − Φ(x)‖ / ‖Φ(x)‖, averaged over the batch."""
    a, b = logits_rec.double(), logits_orig.double()
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    rel = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)
    return {"logit_cosine": cos.mean().item(), "logit_rel_l2": rel.mean().item()}


def pixel_fidelity(rec: torch.Tensor, orig: torch.Tensor) -> dict[str, float]:
    """PSNR (dB, mean over images; ``inf`` when identical) and SSIM on images in [-1, 1]."""
    if rec.shape != orig.shape:
        raise ValueError(
            f"pixel_fidelity needs images of the same shape, got {tuple(rec.shape)} and "
            f"{tuple(orig.shape)}; resize the reconstructions to the originals' size first"
        )
    x, y = _unit(rec), _unit(orig)
    return {"psnr": _psnr01(x, y).mean().item(), "ssim": float(ssim(x, y, data_range=1.0))}


def _unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as float32 in [0, 1], where they stay on."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def _psnr01(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each pair of (N, ...) images in [0, 1] (data range 1): ``inf`` when equal."""
    return -10 * torch.log10((x - y).pow(2).flatten(1).mean(1))


@functools.lru_cache(maxsize=32)
def _blur_matrix(n: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n) matrix A with ``A @ v`` = the Gaussian blur of v (window ``int(3.5σ + 0.5)·2 + 1``
    taps, normalised) over v reflect-padded at both ends: torchmetrics' SSIM window, padding
    and valid convolution folded into one product."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    pad = (size - 1) // 2
    if n <= pad:
        raise ValueError(f"ssim: images need more than {pad} pixels a side for σ={sigma} "
                         f"(reflect padding of {pad}), got {n}")
    d = torch.arange(size, dtype=torch.float64) - pad
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g /= g.sum()
    src = torch.arange(n).view(-1, 1) + torch.arange(size).view(1, -1) - pad  # (n, size)
    src = src.abs()  # reflect at the start ...
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # ... and at the end
    a = torch.zeros(n, n, dtype=torch.float64)
    a.scatter_add_(1, src, g.expand(n, size).contiguous())
    return a.to(dtype=dtype, device=device)


def ssim(preds: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM of (N, C, H, W) image pairs, as torchmetrics'
    ``structural_similarity_index_measure`` with its defaults. The blurred moments are
    ``A_h · X · A_wᵀ`` per channel (``_blur_matrix``): on 512 images of 3x32x32 one thread
    takes 57 ms against torchmetrics' 419 ms, whose grouped 11x11 convolution of the padded
    images is most of a demo evaluation's SSIM time (RESULTS.md Demo round 25)."""
    if preds.shape != target.shape or preds.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(preds.shape)} and {tuple(target.shape)}")
    dtype = preds.dtype if preds.is_floating_point() else torch.float32
    x, y = preds.to(dtype), target.to(dtype)
    ah = _blur_matrix(x.shape[-2], float(sigma), dtype, x.device)
    aw = _blur_matrix(x.shape[-1], float(sigma), dtype, x.device)
    mx, my, sxx, syy, sxy = ah @ torch.stack([x, y, x * x, y * y, x * y]) @ aw.T
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mxx, myy, mxy = mx * mx, my * my, mx * my
    var_x, var_y = (sxx - mxx).clamp_min(0), (syy - myy).clamp_min(0)
    index = ((2 * mxy + c1) * (2 * (sxy - mxy) + c2)) / ((mxx + myy + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1).mean()


def psnr_per_image(rec: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image pair (N,), images in [-1, 1]; 100 dB for identical images."""
    return _psnr01(_unit(rec), _unit(orig)).clamp(max=100.0)


def noise_std(resamples: torch.Tensor) -> torch.Tensor:
    """Per-pixel std over K resamples: (N, K, C, H, W) in [-1, 1] -> (N, H, W) in [0, 1] units.

    The channel std is averaged; a pixel the logits pin down has std 0.
    """
    if resamples.dim() != 5 or resamples.shape[1] < 2:
        raise ValueError(
            "noise_std needs resamples shaped (N, K, C, H, W) with K >= 2, got "
            f"{tuple(resamples.shape)}"
        )
    return (resamples.float() / 2).std(dim=1, unbiased=True).mean(dim=1)


def reconstruction_metrics(
    classifier: torch.nn.Module,
    rec: torch.Tensor,
    orig: torch.Tensor,
    labels: torch.Tensor | None = None,
    logits_orig: torch.Tensor | None = None,
) -> dict[str, float]:
    """All per-batch metrics of reconstructions ``rec`` of ``orig`` (both in [-1, 1])."""
    with torch.no_grad():
        if logits_orig is None:
            logits_orig = classifier_logits(classifier, orig)
        logits_rec = classifier_logits(classifier, rec)
    out = classifier_agreement(logits_rec, logits_orig, labels)
    out.update(logit_consistency(logits_rec, logits_orig))
    out.update(pixel_fidelity(rec, orig))
    return out


def json_safe(value):
    """Replace non-finite floats by strings so metrics.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


# ---- LPIPS / FID: only with local weights ---------------------------------------------------


def _need_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} weight file {p} does not exist; pass the path of a local torchvision "
            f"state dict (fastinv never downloads weights)"
        )
    return p


def lpips(rec: torch.Tensor, orig: torch.Tensor, alexnet_weights: str | Path | None) -> float | str:
    """LPIPS (AlexNet) with the backbone read from a local torchvision ``alexnet`` state dict.

    The linear heads ship with torchmetrics; the backbone does not, so without
    ``alexnet_weights`` the answer is ``"not computed"``.
    """
    if alexnet_weights is None:
        return f"{NOT_COMPUTED} (pass --lpips-alexnet PATH to a torchvision alexnet state dict)"
    from torchmetrics.functional.image.lpips import _LPIPS

    sd = torch.load(_need_file(alexnet_weights, "LPIPS alexnet"), map_location="cpu", weights_only=True)
    # pretrained=True: the linear heads torchmetrics ships; pnet_rand=True: no backbone download
    net = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval().to(rec.device)
    backbone = net.net.state_dict()
    for key in backbone:  # slice{i}.{layer}.{param} <- features.{layer}.{param}
        _, layer, param = key.split(".")
        backbone[key] = sd[f"features.{layer}.{param}"]
    net.net.load_state_dict(backbone)
    with torch.no_grad():
        return net(rec.float().clamp(-1, 1), orig.float().clamp(-1, 1)).mean().item()


def fid(real: torch.Tensor, fake: torch.Tensor, inception_weights: str | Path | None) -> float | str:
    """FID with a torchvision ``inception_v3`` read from a local state dict (pool features).

    Meaningful only for a few thousand images; on small sets it is biased upwards.
    """
    if inception_weights is None:
        return f"{NOT_COMPUTED} (pass --fid-inception PATH to a torchvision inception_v3 state dict)"
    import torchvision
    from torchmetrics.image.fid import FrechetInceptionDistance

    sd = torch.load(_need_file(inception_weights, "FID inception_v3"), map_location="cpu", weights_only=True)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(sd)
    net.fc = torch.nn.Identity()
    net.eval()

    class _Features(torch.nn.Module):
        num_features = 2048

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):  # x: uint8 or float in [0, 1] from torchmetrics
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
            return self.m((x - mean) / std)

    metric = FrechetInceptionDistance(feature=_Features(net), normalize=True).to(real.device)
    metric.update(_unit(real), real=True)
    metric.update(_unit(fake), real=False)
    return metric.compute().item()


def optional_perceptual_metrics(
    rec: torch.Tensor,
    orig: torch.Tensor,
    lpips_alexnet: str | Path | None = None,
    fid_inception: str | Path | None = None,
) -> dict[str, float | str]:
    return {"lpips": lpips(rec, orig, lpips_alexnet), "fid": fid(orig, rec, fid_inception)}
