"""Measures of an inversion that cannot be satisfied by fooling the inverted classifier.

- The **judge**: a classifier of another architecture and seed (``fastinv:small_cnn`` in the
  demo), trained only on real training images, never used to train or select an inverter.
  ``judge_vs_label``: judge(x̂) is x's true class; ``judge_vs_judge``: judge(x̂) = judge(x).
- **Realism**: KID between real held-out images and a method's outputs in the judge's pooled
  feature space (``fastinv.invert.stats.kid``; no downloaded Inception weights).
- Per-image values (``per_image``) so the report can put bootstrap intervals on differences
  between methods and classifiers measured on the same images.
- The **logit-space nearest neighbour**: for each held-out image, the training image whose
  logits are nearest — what the logits pin down within the data, at no training cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastinv.invert.metrics import classifier_logits, psnr_per_image, to_classifier_input
from fastinv.invert.stats import kid


@torch.no_grad()
def judge_features(judge, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The judge's pooled penultimate features of images in [-1, 1] (needs ``net.embed``)."""
    net = getattr(judge, "net", judge)
    if not hasattr(net, "embed"):
        raise ValueError(f"the judge {type(net).__name__} has no embed(); use a fastinv judge "
                         "(fastinv classifier train --arch=small_resnet or --arch=small_cnn)")
    return torch.cat([net.embed(to_classifier_input(chunk, judge)).float()
                      for chunk in images.split(batch_size)])


@torch.no_grad()
def per_image(classifier, judge, rec: torch.Tensor, orig: torch.Tensor, labels: torch.Tensor,
              logits_orig: torch.Tensor, judge_orig: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
    """One value per image (N,) for each measure; ``judge_orig`` = judge(x).argmax if known."""
    lr = classifier_logits(classifier, rec)
    out = {"phi_agree": (lr.argmax(1) == logits_orig.argmax(1)).float(),
           "logit_cosine": F.cosine_similarity(lr.double(), logits_orig.double(), dim=1).float()}
    out["psnr"] = psnr_per_image(rec, orig)
    if judge is not None:
        jr = classifier_logits(judge, rec).argmax(1)
        if judge_orig is None:
            judge_orig = classifier_logits(judge, orig).argmax(1)
        out["judge_vs_label"] = (jr == labels.to(jr.device)).float()
        out["judge_vs_judge"] = (jr == judge_orig).float()
    return out


def realism(judge, real: torch.Tensor, fake: torch.Tensor, seed: int = 0,
            real_features: torch.Tensor | None = None) -> dict[str, float]:
    """KID (mean and std over subsets) of ``fake`` against ``real`` in the judge's features."""
    fr = judge_features(judge, real) if real_features is None else real_features
    mean, std = kid(fr, judge_features(judge, fake), seed=seed)
    return {"kid": mean, "kid_std": std}


@torch.no_grad()
def nearest_neighbour(train_logits: torch.Tensor, train_images: torch.Tensor,
                      query_logits: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """For each query, the training image whose logits are nearest in L2 (ties: lowest index)."""
    if train_logits.shape[1] != query_logits.shape[1]:
        raise ValueError(f"logits of different widths: train {tuple(train_logits.shape)}, "
                         f"query {tuple(query_logits.shape)}")
    if train_logits.shape[0] != train_images.shape[0] or train_logits.shape[0] == 0:
        raise ValueError("nearest_neighbour needs one training image per training logit row")
    t = train_logits.double()
    idx = torch.cat([torch.cdist(q.double(), t).argmin(1) for q in query_logits.split(batch_size)])
    return train_images[idx.to(train_images.device)]


class NearestNeighbour(torch.nn.Module):
    """The NN baseline as a decoder ``(logits, noise) -> image`` (it ignores the noise), so it
    runs through the same comparison as the inverter and DeePSiM."""

    def __init__(self, train_logits: torch.Tensor, train_images: torch.Tensor):
        super().__init__()
        self.register_buffer("train_logits", train_logits.float())
        self.register_buffer("train_images", train_images)
        self.noise_dim = 1

    def sample_noise(self, n: int, generator=None, device=None) -> torch.Tensor:
        return torch.zeros(n, 1, device=device if device is not None else self.train_logits.device)

    def forward(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return nearest_neighbour(self.train_logits, self.train_images, logits)
