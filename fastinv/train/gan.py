"""Train the inverter ``G(z, ε)`` of a frozen classifier ``Φ`` against a projection
discriminator ``D(x, z)``, ``z = Φ(x)`` the raw logits (Teterwak et al., ICML 2021).

One training step is ``d_steps`` discriminator updates then one generator update, each over
``accumulate`` micro-batches, with the hinge loss (fused op) and Adam(β=(0, 0.999)). The
generator update conditions on the logits of the last real micro-batches seen by D, with fresh
noise. G's EMA (from ``ema_start``), saved with its batch norms' standing statistics, is what
evaluation and ``load_inverter`` use.

Under torchrun, G and D are wrapped in DDP: D's update goes through D's wrapper (gradients
averaged over ranks), G's through G's; the other network is called unwrapped and without
parameter gradients in each case. Rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fastinv.models.classifiers import Classifier, load_classifier
from fastinv.models.discriminator import Discriminator, DiscriminatorConfig
from fastinv.models.generator import Generator, GeneratorConfig
from fastinv.models.layers import sigma_stats
from fastinv.ops import hinge_loss_d, hinge_loss_g
from fastinv.train import checkpoint, distributed, precision
from fastinv.train.augment import diff_augment, diff_augment_pair, diff_augment_whole, parse_policy
from fastinv.train.config import TrainConfig, save_yaml, validate
from fastinv.train.ema import EMA, standing_statistics
from fastinv.train.feature_stats import PhiStats, stats_loss
from fastinv.train.monitor import Monitor, image_grid
from fastinv.train.optim import fused
from fastinv.train.phi_taps import PhiFeatures
from fastinv.train.regularizers import r1_due, r1_loss

# named ranges a torch.profiler trace groups the step by (benchmarks/profile_train.py); a few
# microseconds each when no profiler runs
_scope = torch.profiler.record_function


class BatchStream:
    """Endless batches from an epoch-based loader, resumable at (epoch, position)."""

    def __init__(self, loader, epoch: int = 0, position: int = 0):
        if len(loader) == 0:
            raise ValueError("the training set gives no full batch per rank: lower "
                             "data.batch_size or use more images")
        self.loader, self.epoch, self.position = loader, epoch, position
        self._it = None

    def _start(self, skip: int) -> None:
        # resume mid-epoch: the loader starts at batch ``skip`` without decoding the ones before
        self.loader.set_epoch(self.epoch, start_batch=skip)
        self._it = iter(self.loader)

    def next(self) -> dict:
        if self._it is None:
            self._start(self.position)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start(0)
            batch = next(self._it)
        self.position += 1
        return batch


def build_models(cfg: TrainConfig, num_classes: int,
                 phi_shape: tuple[int, int] = (0, 0)) -> tuple[Generator, Discriminator]:
    """G and D of ``cfg``; ``phi_shape`` = (channels, size) of the Φ feature map D reads (the
    Φ-feature D option; two equal-length lists for several maps), (0, 0) when off."""
    m, res = cfg.model, cfg.data.resolution
    common = dict(num_classes=num_classes, resolution=res,
                  attention_resolution=m.attention_resolution, logit_preprocess=m.logit_preprocess,
                  logit_temperature=m.logit_temperature, sn_eps=m.sn_eps, layers=m.layers)
    g = GeneratorConfig(ch=m.g_ch, noise_dim=m.noise_dim, shared_dim=m.shared_dim,
                        bn_eps=m.bn_eps, cond_input=m.g_cond_input,
                        shared_mlp=m.g_shared_mlp, full_res_ch=m.g_full_res_ch, **common)
    d = DiscriminatorConfig(ch=m.d_ch, pool=m.d_pool, phi_channels=phi_shape[0],
                            phi_resolution=phi_shape[1], logit_head=cfg.optim.d_head_weight > 0,
                            head_within=cfg.optim.d_head_within_weight > 0,
                            mbstd_group=m.d_mbstd, full_res_ch=m.d_full_res_ch,
                            space_to_depth=m.d_space_to_depth, **common)
    return Generator(g), Discriminator(d)


def _prepare_data(cfg: TrainConfig, run_dir: Path, clf: Classifier, info) -> Path:
    if cfg.data.root is not None:
        root = Path(cfg.data.root)
        split = root / "train" if (root / "train").is_dir() else root
        if not split.exists():
            raise FileNotFoundError(f"data.root {root} does not exist; pass an ImageFolder "
                                    "directory (with train/) or leave data.root unset")
        return split
    root = run_dir / "data"
    if info.is_main and not (root / "factors.csv").exists():
        from fastinv.data import make_synthetic_dataset

        make_synthetic_dataset(root, n=cfg.data.synthetic_n, seed=cfg.data.seed,
                               resolution=max(cfg.data.resolution, min(clf.input_size, 128)))
    distributed.barrier(info)
    return root / "train"


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint and exits at the step's end."""

    def __init__(self):
        self.raised, self._old = False, {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def mismatched_logits(z: torch.Tensor, generator: torch.Generator, pairs: str = "other_class"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The "mismatched-logit D" pairs: each row's partner logits and a 0/1 mask of the rows
    whose pair enters the loss.

    ``other_class`` (GAN-CLS): the partner is a random row of the batch; pairs of the same Φ
    class are left out (for a one-hot class they would be true pairs). ``same_class``: the
    partner is a random *other* row of the same Φ class (rows with none are left out), so D
    must tell which of two same-class logit vectors belongs to the image: what logits carry
    beyond the class (on the synthetic shapes, the size), which a D trained on other-class
    pairs never needs to read."""
    if pairs == "other_class":
        perm = torch.randperm(len(z), generator=generator, device=z.device)
        return z[perm], (z.argmax(1) != z[perm].argmax(1)).float()
    if pairs != "same_class":
        raise ValueError(f"mismatch pairs must be other_class or same_class, got {pairs!r}")
    cls = z.argmax(1)
    ok = (cls[:, None] == cls[None, :]) & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    # a random valid partner per row: the largest of uniform scores over the valid columns
    scores = torch.rand(len(z), len(z), generator=generator, device=z.device)
    partner = scores.masked_fill(~ok, -1.0).argmax(1)
    return z[partner], ok.any(1).float()


def lr_scale(step: int, total: int, decay_from: float) -> float:
    """The learning-rate factor of G step ``step`` (0-based) of ``total``: 1 until
    ``decay_from * total``, then linear to 0 at ``total`` (the last step still moves)."""
    start = decay_from * total
    if decay_from >= 1 or step < start:
        return 1.0
    return max(0.0, (total - step) / (total - start))


def mode_seeking_loss(a: torch.Tensor, b: torch.Tensor, eps_a: torch.Tensor,
                      eps_b: torch.Tensor) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al. 2019) for images ``a``, ``b`` drawn from the same
    logits with noises ``eps_a``, ``eps_b``: 1 / (mean |a - b| / mean |eps_a - eps_b|), so G
    lowers it by making different noise give different images."""
    ratio = ((a.float() - b.float()).abs().flatten(1).mean(1)
             / (eps_a.float() - eps_b.float()).abs().flatten(1).mean(1).clamp_min(1e-8))
    return 1.0 / (ratio.mean() + 1e-5)


def head_loss(pred: torch.Tensor, z: torch.Tensor, form: str, preprocess,
              within=None, within_weight: float = 0.0,
              within_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The D logit head's loss for its prediction ``pred`` on images whose logits are ``z``:
    "mse" regresses ``preprocess(z)`` (D's view of the logits), "ce" (ACGAN) is the softmax
    cross-entropy against Φ's top-1 class. With ``within_weight`` > 0 the head's second half
    regresses ``within(z)`` (the within-class deviations, Discriminator.within_class) too,
    averaged over the images ``within_rows`` (bool per image; all when None; 0 when none, the
    graph still connected, as DDP needs)."""
    c = z.shape[1]
    if form == "ce":
        loss = F.cross_entropy(pred[:, :c].float(), z.argmax(1))
    else:
        loss = (pred[:, :c].float() - preprocess(z)).pow(2).mean()
    if within_weight > 0:
        per = (pred[:, c:].float() - within(z)).pow(2).mean(1)
        if within_rows is None:
            per = per.mean()
        else:
            w = within_rows.to(per.dtype)
            per = (per * w).sum() / w.sum().clamp_min(1)
        loss = loss + within_weight * per
    return loss


class InverterTrainer:
    """G, D, their EMA, optimisers and data of one run. ``__init__`` runs the named steps below
    in this order (the order fixes which random numbers each consumes: a resumed or re-run
    seed gives the same models bit for bit)."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo, loader=None,
                 classifier: Classifier | None = None):
        validate(cfg)
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.out_dir)
        self.classifier = self._load_classifier(classifier)
        self.batches = BatchStream(loader if loader is not None else self._make_loader())
        self._cache_logits()
        phi_shape = self._attach_phi()
        self._build_models(phi_shape)
        self._make_optimizers()
        self._wrap_for_training()
        dev = info.device
        self.noise_gen = torch.Generator(dev).manual_seed(cfg.run.seed * 7919 + 1 + info.rank)
        self.augment = parse_policy(cfg.optim.diffaug)
        self.aux_augment = parse_policy(cfg.optim.aux_augment)
        self.step = self.d_step = 0
        # optim.reuse_fakes=previous: the last G update's (images, logits), D's next fakes;
        # previous_seen: those images augmented as G's update saw them, and the D feature
        # network's maps of them in _last_maps (D's next fakes as they are)
        self._last_fakes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_maps: tuple[torch.Tensor, ...] | None = None

    def _load_classifier(self, classifier: Classifier | None) -> Classifier:
        """The frozen Φ (a copy of the one given, or loaded from ``cfg.classifier``), on this
        rank's device, prepared to run fast (``_fast``)."""
        c = self.cfg.classifier
        torch.manual_seed(self.cfg.run.seed)  # a random-init classifier is the same on every rank
        if classifier is not None:
            return self._fast(copy.deepcopy(classifier))  # the caller's stays as it was
        return self._fast(load_classifier(c.spec, weights=c.weights, random_init=c.random_init,
                                          num_classes=c.num_classes))

    def _fast(self, classifier: Classifier) -> Classifier:
        """A frozen classifier as training runs it: on this rank's device (on CPU in
        channels_last, 1.8x its NCHW speed: Classifier.place) with its batch norms folded into
        the convolutions before them (the same outputs; the demo's SmallCNN forward and input
        gradient on 16 images 5.2-6.1 ms against 7.4-8.6, RESULTS.md issue 11 round 13). Φ runs
        on every image of a step (the batch's logits, D's maps of reals and fakes, G's
        gradient). A convolution tapped by name keeps its own output."""
        o, m = self.cfg.optim, self.cfg.model
        named = {n.strip() for spec in (m.d_phi_layer, o.phi_stats_layers) if spec
                 and spec.strip() not in ("auto", "auto:each") for n in spec.split(",")}
        classifier = classifier.place(self.info.device)
        classifier.fold_batch_norm(keep=named)
        return classifier

    def _make_loader(self):
        """Training batches of ``cfg.data`` (generating the synthetic set first if asked):
        decoded once and served from memory (``in_memory``), or streamed by DALI / PIL."""
        from fastinv.data import make_loader

        cfg, info, d = self.cfg, self.info, self.cfg.data
        common = dict(resolution=d.resolution, classifier_size=self.classifier.input_size,
                      classifier_mean=self.classifier.mean,
                      classifier_std=self.classifier.std, backend=d.backend, device=info.device,
                      num_workers=d.workers)
        split = _prepare_data(cfg, self.run_dir, self.classifier, info)
        if d.in_memory:
            from fastinv.data.memory import MemoryLoader

            return MemoryLoader(make_loader(split, batch_size=256, train=False, **common),
                                batch_size=d.batch_size, rank=info.rank,
                                world_size=info.world_size, seed=d.seed)
        return make_loader(split, batch_size=d.batch_size, train=True, rank=info.rank,
                           world_size=info.world_size, seed=d.seed, drop_last=True,
                           crop_scale=(d.crop_min_scale, 1.0), **common)

    def _cache_logits(self) -> None:
        """Φ's logits of every training image (as stored and mirrored), computed once where the
        data is in memory and that costs less than computing them every step (two views of
        each image against batch_size x steps): Φ is frozen, so a step would compute the same
        numbers, to the rounding of the batch size. On the demo's data Φ's forward was 3.3% of
        a step (benchmarks/RESULTS.md, Demo round 26)."""
        loader, c = self.batches.loader, self.cfg
        if not hasattr(loader, "cache_logits"):
            return
        per_run = c.data.batch_size * c.optim.d_steps * c.optim.accumulate * c.run.steps
        if 2 * len(loader.images) > per_run:
            return

        def logits(t: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return self.classifier(self._input(t))

        loader.cache_logits(logits)

    def _logits(self, batch: dict) -> torch.Tensor:
        """Φ's float32 logits of a batch's classifier input (cached ones where the loader has
        them); call under no_grad."""
        if "logits" in batch:
            return batch["logits"]
        with self._autocast():
            return self.classifier(self._input(batch["classifier_input"])).float()

    def _attach_phi(self):
        """Taps on Φ's feature maps for D (``model.d_phi_layer``) and for the feature-statistics
        loss; returns the (channels, size) D's Φ inputs need ((0, 0): none)."""
        cfg, dev = self.cfg, self.info.device
        self.phi = None
        phi_shape = (0, 0)
        if cfg.model.d_phi_layer:
            from fastinv.models.discriminator import trunk_sizes

            self.phi = PhiFeatures(self._d_feature_net(), cfg.model.d_phi_layer,
                                   cfg.data.resolution, trunk_sizes(cfg.data.resolution))
            shapes = self.phi.shapes(cfg.data.resolution, dev)
            # one map: plain ints, as checkpoints from before several maps store them
            phi_shape = shapes[0] if len(shapes) == 1 else tuple(map(list, zip(*shapes)))
        self.phi_stats = None
        if cfg.optim.phi_stats_weight > 0:
            self.phi_stats = PhiStats(self.classifier, cfg.optim.phi_stats_layers,
                                      cfg.data.resolution)
        return phi_shape

    def _d_feature_net(self) -> Classifier:
        """The classifier whose maps D reads: Φ, or ``classifier.d_net_weights`` (frozen, on
        this rank's device; PhiFeatures prepares images for it at its own input size)."""
        c = self.cfg.classifier
        if not c.d_net_weights:
            return self.classifier
        return self._fast(load_classifier(c.d_net_spec or c.spec, weights=c.d_net_weights))

    def _build_models(self, phi_shape) -> None:
        """G, D and G's EMA copy from one seed (identical on every rank), cross-replica BN,
        the affine logit statistics, the memory format, and the EMA schedule."""
        cfg, info, dev = self.cfg, self.info, self.info.device
        torch.manual_seed(cfg.run.seed)  # identical initial models on every rank
        with dev:  # built on the device: orthogonal init of BigGAN-128's weights is slow on CPU
            self.G, self.D = build_models(cfg, self.classifier.num_classes, phi_shape)
            self.G_ema = Generator(self.G.config)
        if cfg.model.cross_replica_bn and info.distributed:
            from fastinv.nn import convert_sync_batchnorm

            # every batch norm of G on the fused op's cross-replica path (gloo or NCCL)
            self.G = convert_sync_batchnorm(self.G)
        # Φ's logits of the first training images, one pass: the affine statistics (4,096)
        # and the EMA's standing statistics (optim.ema_standing_batches batches)
        n_standing = cfg.optim.ema_standing_batches * cfg.data.batch_size
        affine = cfg.model.logit_preprocess == "affine"
        within = cfg.optim.d_head_within_weight > 0
        n = max(4096 if affine or within else 0, n_standing)
        z = self._training_logits(n) if n else None
        if affine:
            self._fit_logit_statistics(z)
        if within:  # after the affine statistics: the class statistics are of D's view
            self._fit_class_statistics(z)
        self._standing_z = z[:n_standing].to(dev) if n_standing else None
        self._standing_step = -1  # the step whose standing statistics G_ema holds
        fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        for net in (self.G, self.D, self.G_ema):
            net.to(dev, memory_format=fmt)
        self.ema = EMA(self.G, self.G_ema, cfg.optim.ema_decay, cfg.optim.ema_start)

    def _fit_class_statistics(self, z: torch.Tensor) -> None:
        """Per Φ class, the mean and std of D's preprocessed logits over training logits ``z``
        (summed over ranks): the within-class head's scale. A class with fewer than 2 images
        gets mean 0 and std 1; stds are floored at 1e-3 of the logits' overall std."""
        c = z.shape[1]
        with torch.no_grad():
            t = self.D.preprocess(z.to(self.info.device)).double()
            onehot = F.one_hot(z.argmax(1).to(t.device), c).double()  # (N, C)
            moments = torch.stack([onehot.sum(0)[:, None].expand(c, c), onehot.T @ t,
                                   onehot.T @ t.pow(2)])
            if self.info.distributed:
                import torch.distributed as dist

                dist.all_reduce(moments)
            count, s1, s2 = moments
            mean = s1 / count.clamp_min(1)
            std = (s2 / count.clamp_min(1) - mean ** 2).clamp_min(0).sqrt()
            # the floor from the summed moments too, so every rank's D gets the same statistics
            n = count[:, 0].sum()
            overall = (s2.sum(0) / n - (s1.sum(0) / n) ** 2).clamp_min(0).sqrt()
            floor = 1e-3 * overall.clamp_min(1e-6)
            few = count < 2
            mean, std = mean.masked_fill(few, 0.0), std.masked_fill(few, 1.0)
            self.D.set_class_statistics(mean.float(), torch.maximum(std, floor).float())

    def _make_optimizers(self) -> None:
        o, dev = self.cfg.optim, self.info.device
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=o.g_lr, betas=(o.beta1, o.beta2),
                                      eps=o.adam_eps, fused=fused(dev))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=o.d_lr, betas=(o.beta1, o.beta2),
                                      eps=o.adam_eps, fused=fused(dev))

    def _wrap_for_training(self) -> None:
        """G_train / D_train take the gradient-carrying passes (DDP-wrapped under torchrun);
        G_fake makes D's fakes without gradients, D_judge scores G's fakes for G's update;
        all four compiled with ``run.compile``."""
        info, dev = self.info, self.info.device
        self.G_fake, self.D_judge = self.G, self.D
        if info.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            self.G_train, self.D_train = DDP(self.G, device_ids=ids), DDP(self.D, device_ids=ids)
        else:
            self.G_train, self.D_train = self.G, self.D
        if self.cfg.run.compile:
            self.G_train, self.D_train = torch.compile(self.G_train), torch.compile(self.D_train)
            self.G_fake, self.D_judge = torch.compile(self.G), torch.compile(self.D)

    @torch.no_grad()
    def _training_logits(self, max_images: int) -> torch.Tensor:
        """Φ's logits of this rank's first (at least ``max_images``, whole batches) training
        images of epoch 0, in the loader's shuffled order; the stream starts epoch 0 again
        after."""
        zs, n = [], 0
        self.batches.loader.set_epoch(0)
        for batch in self.batches.loader:
            zs.append(self._logits(batch))
            n += len(zs[-1])
            if n >= max_images:
                break
        self.batches.loader.set_epoch(0)
        return torch.cat(zs)

    def _fit_logit_statistics(self, z: torch.Tensor) -> None:
        """Per-logit mean and std of Φ over training logits ``z``, averaged over ranks so every
        rank's models are identical; fixed for the whole run (a checkpoint carries them)."""
        moments = torch.stack([z.mean(0), z.pow(2).mean(0)])
        if self.info.distributed:
            import torch.distributed as dist

            dist.all_reduce(moments)
            moments /= self.info.world_size
        mean, std = moments[0], (moments[1] - moments[0] ** 2).clamp_min(0).sqrt()
        for net in (self.G, self.D, self.G_ema):
            net.preprocess.set_statistics(mean, std)

    def _standing_ema(self) -> None:
        """G_ema's batch-norm statistics recomputed for its own weights (standing statistics,
        ``fastinv.train.ema``), once per step, before it is saved or drawn: a pure function of
        its weights (the same logits and noise every time), so a resumed run saves what the
        run that was not stopped saves. The next EMA update copies the live G's again."""
        if self._standing_z is None or self._standing_step == self.step:
            return
        gen = torch.Generator(self.info.device).manual_seed(self.cfg.run.seed * 7919 + 2)
        standing_statistics(self.G_ema, self._standing_z, self.cfg.data.batch_size, gen)
        self._standing_step = self.step

    # --- one training step -------------------------------------------------------------------

    def _autocast(self):
        return precision.autocast(self.cfg.run.amp, self.info.device)

    def _input(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.info.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.cfg.run.channels_last else t

    def _sync(self, net, micro: int, accumulate: int):
        # accumulate locally, all-reduce gradients only with the last micro-batch
        if self.info.distributed and micro < accumulate - 1:
            return net.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor | float]:
        """One G update after ``d_steps`` D updates; returns the step's losses and D outputs
        (0-dim tensors on the device, averaged over micro-batches)."""
        o, acc = self.cfg.optim, self.cfg.optim.accumulate
        if o.lr_decay_from < 1:  # constant rates (the default) leave the optimizers alone
            scale = lr_scale(self.step, self.cfg.run.steps, o.lr_decay_from)
            for opt, lr in ((self.opt_G, o.g_lr), (self.opt_D, o.d_lr)):
                for group in opt.param_groups:
                    group["lr"] = lr * scale
        stats = {"loss_d": 0.0, "d_real": 0.0, "d_fake": 0.0}
        logits, reals = [], []
        for _ in range(o.d_steps):
            self.opt_D.zero_grad(set_to_none=True)
            for micro in range(acc):
                with _scope("data"):
                    batch = self.batches.next()
                    x = self._input(batch["image"])
                with torch.no_grad(), _scope("classifier"):
                    z = self._logits(batch)
                z_fake = z  # the logits D's fakes were drawn for
                reused = None  # (previous_seen) the maps of the fakes as G's update saw them
                if o.reuse_fakes == "same":  # G's update below backpropagates through these
                    with self._autocast(), _scope("G forward"):
                        g_fake, g_ms = self._generate(z, stats, acc)
                    fake = g_fake.detach()
                elif (o.reuse_fakes in ("previous", "previous_seen")
                      and self._last_fakes is not None
                      and len(self._last_fakes[0]) == len(z)):  # (a loader's short last batch)
                    fake, z_fake = self._last_fakes  # the last G update's images and logits
                    if o.reuse_fakes == "previous_seen":  # augmented already, maps with them
                        reused = self._last_maps
                else:
                    with torch.no_grad(), self._autocast(), _scope("G forward (D step)"):
                        fake = self.G_fake(z, self._noise(len(z)))
                logits.append(z)
                reals.append(x)
                with self._sync(self.D_train, micro, acc), self._autocast(), _scope("D forward"):
                    # real and fake in one call: DDP sees one forward per backward
                    if reused is None:
                        both, whole = self._augment_whole(torch.cat([x, fake.to(x.dtype)]))
                    else:
                        seen_x, whole = self._augment_whole(x)
                        both = torch.cat([seen_x, fake.to(x.dtype)])
                    zs = torch.cat([z, z_fake])
                    n_x = len(x)
                    if o.mismatch_weight > 0:  # the same augmented reals, other images' logits
                        z_other, keep = mismatched_logits(z, self.noise_gen, o.mismatch_pairs)
                        both, zs = torch.cat([both, both[:n_x]]), torch.cat([zs, z_other])
                    if reused is None:
                        maps = self._phi_of(both, grad=False, drop=o.d_phi_dropout)
                    else:  # only the reals through the feature network; the fakes' maps reused
                        real_maps = self._phi_of(torch.cat([both[:n_x], both[2 * n_x:]]),
                                                 grad=False, drop=o.d_phi_dropout)
                        maps = tuple(torch.cat([m[:n_x], f.to(m.dtype), m[n_x:]])
                                     for m, f in zip(real_maps, reused))
                    out = self.D_train(both, zs, *maps,
                                       head=o.d_head_weight > 0, head_detach=o.d_head_detach)
                    out, pred = out if o.d_head_weight > 0 else (out, None)
                    d_real, d_fake = out[: len(x)], out[len(x): 2 * len(x)]
                    loss = hinge_loss_d(d_real, d_fake)
                    n = o.d_steps * acc  # micro-batches averaged into the step's statistics
                    if o.mismatch_weight > 0:
                        d_mis, n_keep = out[2 * len(x):].float(), keep.sum().clamp_min(1)
                        mis = (torch.relu(1 + d_mis) * keep).sum() / n_keep
                        stats["d_mismatch"] = (stats.get("d_mismatch", 0.0)
                                               + (d_mis * keep).sum().detach() / n_keep / n)
                        loss = loss + o.mismatch_weight * mis
                    if pred is not None:  # the head learns Φ's logits of real images only
                        head = self._head_loss(pred[: len(x)], z, whole[: len(x)])
                        stats["d_head"] = stats.get("d_head", 0.0) + head.detach() / n
                        loss = loss + o.d_head_weight * head
                with _scope("D backward"):
                    (loss / acc).backward()
                if o.r1_gamma > 0 and r1_due(self.d_step, o.r1_every):
                    # its own D forward (on the reals as D sees them), a double backward;
                    # with Φ-feature D the gradient w.r.t. the image also runs through Φ
                    r1 = r1_loss(self._d_of_image, x, z, o.r1_gamma, o.r1_every)
                    self._backward_r1(r1 / acc)
                    stats["r1"] = stats.get("r1", 0.0) + r1.detach() / (o.d_steps * acc)
                # statistics stay on the device: no sync per micro-batch
                stats["loss_d"] += loss.detach() / n
                stats["d_real"] += d_real.detach().float().mean() / n
                stats["d_fake"] += d_fake.detach().float().mean() / n
            with _scope("optimizer"):
                self.opt_D.step()
            self.d_step += 1

        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        stats["loss_g"] = stats["aux_logit"] = 0.0
        for micro in range(acc):
            z, x = logits[len(logits) - acc + micro], reals[len(reals) - acc + micro]
            with self._sync(self.G_train, micro, acc), self._autocast(), _scope("G forward"):
                if o.reuse_fakes == "same":  # drawn before D's update (d_steps = accumulate = 1)
                    fake, ms = g_fake, g_ms
                else:
                    fake, ms = self._generate(z, stats, acc)
                if o.reuse_fakes == "previous":  # D's fakes in the next step
                    self._last_fakes = (fake.detach(), z)
                if o.dnet_match_weight > 0:  # x under the same augmentation as G's image
                    seen_d, seen_x, whole = diff_augment_pair(
                        fake, x.to(fake.dtype), self.augment, self.noise_gen, o.cutout_p)
                else:
                    seen_d, whole = self._augment_whole(fake)
                net_logits_on = o.class_weight > 0 or o.dnet_match_weight > 0
                maps = self._phi_of(seen_d, grad=True, scale=o.g_phi_grad, drop=o.d_phi_dropout,
                                    logits=net_logits_on)
                if net_logits_on:
                    net_logits, maps = maps
                if o.class_weight > 0:  # the D feature network must read Φ's class of z
                    cls = F.cross_entropy(net_logits.float(), z.argmax(1))
                    stats["class"] = stats.get("class", 0.0) + cls.detach() / acc
                if o.dnet_match_weight > 0:  # ... and the logits it reads in x
                    with torch.no_grad():
                        target = self._phi_of(seen_x, grad=False, logits=True)[0].float()
                    match = ((net_logits.float() - target).pow(2).mean()
                             / target.var(dim=0, unbiased=False).mean().clamp_min(1e-6))
                    stats["dnet_match"] = stats.get("dnet_match", 0.0) + match.detach() / acc
                if o.reuse_fakes == "previous_seen":  # D's next fakes as D saw them, and maps
                    self._last_fakes = (seen_d.detach(), z)
                    self._last_maps = tuple(m.detach() for m in maps)
                out = self.D_judge(seen_d, z, *maps, head=o.d_head_weight > 0)
                if o.d_head_weight > 0:  # G: D's head must read z's logits in G's image
                    out, pred = out
                    g_head = self._head_loss(pred, z, whole)
                    stats["g_head"] = stats.get("g_head", 0.0) + g_head.detach() / acc
                loss = hinge_loss_g(out)
                stats["loss_g"] += loss.detach() / acc
                if o.d_head_weight > 0:
                    loss = loss + o.d_head_weight * g_head
                if o.mode_seeking_weight > 0:
                    loss = loss + o.mode_seeking_weight * ms
                if o.class_weight > 0:
                    loss = loss + o.class_weight * cls
                if o.dnet_match_weight > 0:
                    loss = loss + o.dnet_match_weight * match
                if o.recon_weight > 0:  # x is the image whose logits z are: G(Φ(x), ε) ≈ x
                    rec = (fake.float() - x.float()).abs().mean()
                    stats["recon"] = stats.get("recon", 0.0) + rec.detach() / acc
                    loss = loss + o.recon_weight * rec
                if self.phi_stats is not None:  # x is the image whose logits z are
                    with torch.no_grad():
                        target = self.phi_stats(x)
                    fs = stats_loss(self.phi_stats(fake), target)
                    stats["phi_stats"] = stats.get("phi_stats", 0.0) + fs.detach() / acc
                    loss = loss + o.phi_stats_weight * fs
                if o.aux_logit_weight > 0:
                    # on the scale G and D see the logits on (affine: unit variance per logit)
                    pre = self.G.preprocess
                    seen = diff_augment(fake, self.aux_augment, self.noise_gen)
                    aux = (pre(self.classifier(self.classifier.prepare(seen)).float())
                           - pre(z)).pow(2).mean()
                    stats["aux_logit"] += aux.detach() / acc
                    loss = loss + o.aux_logit_weight * aux
            with _scope("G backward"):
                (loss / acc).backward()
        with _scope("optimizer"):
            self.opt_G.step()
        self.D.requires_grad_(True)
        self.step += 1
        with _scope("EMA"):
            self.ema.update(self.step)
        return stats

    def _generate(self, z: torch.Tensor, stats: dict, acc: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """G's images of logits ``z`` with gradients, and the mode-seeking term (None when off;
        its value goes into ``stats``)."""
        noise = self._noise(len(z))
        if self.cfg.optim.mode_seeking_weight <= 0:
            return self.G_train(z, noise), None
        # a second noise draw for the first half of the logits, in the same G call (one
        # forward per backward under DDP); only the first len(z) go on to D
        half = max(1, len(z) // 2)
        noise2 = self._noise(half)
        both = self.G_train(torch.cat([z, z[:half]]), torch.cat([noise, noise2]))
        fake, fake2 = both[: len(z)], both[len(z):]
        ms = mode_seeking_loss(fake[:half], fake2, noise[:half], noise2)
        stats["mode_seeking"] = stats.get("mode_seeking", 0.0) + ms.detach() / acc
        return fake, ms

    def _head_loss(self, pred: torch.Tensor, z: torch.Tensor, whole: torch.Tensor
                   ) -> torch.Tensor:
        """The head's loss; its within-class term over the images the cutout left ``whole``
        when some are (cutout_p < 1)."""
        o = self.cfg.optim
        return head_loss(pred, z, o.d_head_loss, self.D.preprocess, self.D.within_class
                         if o.d_head_within_weight > 0 else None, o.d_head_within_weight,
                         within_rows=whole if o.cutout_p < 1 else None)

    def _phi_of(self, images: torch.Tensor, grad: bool, scale: float = 1.0,
                drop: float = 0.0, logits: bool = False):
        """D's extra argument: Φ's feature map of the images D sees (empty when the option is
        off). Φ's weights are frozen; with ``grad`` the gradient flows through it to G,
        multiplied by ``scale`` (0: none; the forward values are the same either way). Each
        image's maps are zeroed with probability ``drop`` (all its maps together). With
        ``logits``: (that network's logits, with the whole gradient under ``grad``; the maps)."""
        if self.phi is None:
            return ()
        with torch.set_grad_enabled(grad and (scale > 0 or logits) and torch.is_grad_enabled()):
            net_logits, *maps = self.phi(images)
        maps = tuple(maps)
        if scale == 0:
            maps = tuple(m.detach() for m in maps)
        elif grad and scale != 1:
            maps = tuple(m.detach() + scale * (m - m.detach()) for m in maps)
        if drop > 0:
            keep = torch.rand(len(images), generator=self.noise_gen, device=images.device) >= drop
            maps = tuple(m * keep.to(m.dtype).view(-1, 1, 1, 1) for m in maps)
        return (net_logits, maps) if logits else maps

    def _backward_r1(self, r1: torch.Tensor) -> None:
        """R1's gradient into D's ``.grad``. Its double backward runs on D itself, around the
        DDP wrapper, so under torchrun the gradient is averaged over ranks here (each rank's
        penalty is of its own real batch), as DDP averages the rest of D's loss."""
        if not self.info.distributed:
            r1.backward()
            return
        import torch.distributed as dist

        params = [p for p in self.D.parameters() if p.requires_grad]
        grads = torch.autograd.grad(r1, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, params)])
        dist.all_reduce(flat)
        flat /= self.info.world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            g = g.view_as(p)
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def _d_of_image(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """D's score of images as D sees them in training (augmented, with Φ's maps), as a
        function of the pixels alone: what R1 differentiates."""
        seen = self._augment(x)
        return self.D(seen, z, *self._phi_of(seen, grad=True))

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return self._augment_whole(x)[0]

    def _augment_whole(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's view of ``x`` and which images the cutout left whole (diff_augment_whole)."""
        if not self.augment:
            return x, torch.ones(len(x), dtype=torch.bool, device=x.device)
        return diff_augment_whole(x, self.augment, self.noise_gen, self.cfg.optim.cutout_p)

    def _noise(self, n: int) -> torch.Tensor:
        return self.G.sample_noise(n, generator=self.noise_gen)

    # --- state ------------------------------------------------------------------------------

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on each), on the CPU, in rank order."""
        if not self.info.distributed:
            return [t.cpu()]
        import torch.distributed as dist

        local = t.to(self.info.device)
        gathered = [torch.empty_like(local) for _ in range(self.info.world_size)]
        dist.all_gather(gathered, local)
        return [g.cpu() for g in gathered]

    def state_dict(self) -> dict:
        self._standing_ema()
        noise = self._gather(self.noise_gen.get_state())  # a collective: every rank calls this
        return {
            "format": checkpoint.FORMAT,
            "step": self.step,
            "data": {"epoch": self.batches.epoch, "position": self.batches.position},
            "config": self.cfg.to_dict(),
            "model_config": {"G": dataclasses.asdict(self.G_ema.config),
                             "D": dataclasses.asdict(self.D.config)},
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "rng": checkpoint.rng_state(), "noise_rng": noise,
            "world_size": self.info.world_size,
            # each rank's next D fakes (reuse_fakes=previous), so a resumed run is bit for bit
            # the run that was not stopped
            **({"last_fakes": [self._gather(t) for t in self._last_fakes]}
               if self._last_fakes is not None else {}),
            **({"last_maps": [self._gather(t) for t in self._last_maps]}
               if self._last_maps is not None else {}),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        if ckpt["world_size"] != self.info.world_size:
            raise ValueError(f"checkpoint was written by {ckpt['world_size']} ranks, this run has "
                             f"{self.info.world_size}; resume with the same world size")
        self.G.load_state_dict(ckpt["G"])
        self.D.load_state_dict(ckpt["D"])
        self.G_ema.load_state_dict(ckpt["G_ema"])
        self.opt_G.load_state_dict(ckpt["opt_G"])
        self.opt_D.load_state_dict(ckpt["opt_D"])
        self.step = int(ckpt["step"])
        self.d_step = self.step * self.cfg.optim.d_steps  # lazy R1's schedule resumes with it
        self.batches = BatchStream(self.batches.loader, ckpt["data"]["epoch"],
                                   ckpt["data"]["position"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.noise_gen.set_state(ckpt["noise_rng"][self.info.rank])
        dev = self.info.device
        if "last_fakes" in ckpt:
            self._last_fakes = tuple(t[self.info.rank].to(dev) for t in ckpt["last_fakes"])
        if "last_maps" in ckpt:
            self._last_maps = tuple(t[self.info.rank].to(dev) for t in ckpt["last_maps"])

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.info.is_main:
            path = checkpoint.atomic_save(state, checkpoint.checkpoint_path(self.run_dir, self.step))
            checkpoint.prune(self.run_dir, self.cfg.run.keep_checkpoints)
        distributed.barrier(self.info)
        return path

    def try_resume(self) -> bool:
        found = checkpoint.latest_checkpoint(self.run_dir)
        if found is None:
            return False
        self.load_state_dict(checkpoint.load(found, device="cpu"))
        return True

    # --- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruction_grid(self, batch: dict, noise: torch.Tensor) -> torch.Tensor:
        """Columns: original | EMA reconstruction | live-G reconstruction."""
        z = self._logits(batch)
        self._standing_ema()
        was = self.G.training
        self.G.eval()
        rows = [batch["image"], self.G_ema(z, noise), self.G(z, noise)]
        self.G.train(was)
        return image_grid(rows)


def train_inverter(cfg: TrainConfig) -> Path:
    """Train (or with ``run.resume`` continue) an inverter; returns the run directory."""
    validate(cfg)
    owns_group = not torch.distributed.is_initialized()
    info = distributed.setup(cfg.run.device)
    try:
        return _run(cfg, info)
    finally:
        if owns_group:
            distributed.cleanup()


def _run(cfg: TrainConfig, info: distributed.DistInfo) -> Path:
    r = cfg.run
    random.seed(r.seed)
    np.random.seed(r.seed)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = r.cudnn_benchmark
    run_dir = Path(r.out_dir)
    if not r.resume and checkpoint.list_checkpoints(run_dir):  # on every rank
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume=true to "
                              "continue it, or choose another --out_dir")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    distributed.barrier(info)
    trainer = InverterTrainer(cfg, info)
    if r.resume:
        trainer.try_resume()
    fixed = None
    if info.is_main:  # a fixed batch and noise for the image grids, away from the train stream
        g = torch.Generator().manual_seed(12345)
        fixed = (next(iter(trainer.batches.loader)), trainer.G.sample_noise(
            min(8, cfg.data.batch_size), generator=g, device="cpu").to(info.device))
        fixed = ({k: v[: len(fixed[1])] for k, v in fixed[0].items()}, fixed[1])
    monitor = Monitor(run_dir, total_steps=r.steps, start_step=trainer.step, enabled=info.is_main,
                      progress=r.progress)
    images_per_step = cfg.data.batch_size * cfg.optim.d_steps * cfg.optim.accumulate * info.world_size
    last_saved = trainer.step if r.resume else -1
    t0, done0 = time.perf_counter(), trainer.step
    try:
        with _StopFlag() as stop, _scope("train loop"):
            while trainer.step < r.steps:
                stats = trainer.train_step()
                monitor.advance()
                step = trainer.step
                if step % r.log_every == 0 or step == r.steps:
                    with _scope("logging"):  # the one host sync of the loop's losses
                        stats = distributed.mean_over_ranks(
                            {k: float(v) for k, v in stats.items()}, info)
                        elapsed = time.perf_counter() - t0
                        stats["img_per_s"] = images_per_step * (step - done0) / max(elapsed, 1e-9)
                        stats.update(sigma_stats(trainer.G))
                        stats.update({f"D_{k}": v for k, v in sigma_stats(trainer.D).items()})
                        monitor.scalars(step, stats)
                    t0, done0 = time.perf_counter(), step
                if info.is_main and (step % r.image_every == 0 or step == r.steps):
                    with _scope("image grid"):
                        monitor.images(step, "reconstructions", trainer.reconstruction_grid(*fixed))
                if step % r.ckpt_every == 0:
                    with _scope("checkpoint"):
                        trainer.save()
                    last_saved = step
                if distributed.any_rank(stop.raised, info):
                    break
        # at exit, after Ctrl-C / SIGTERM too (an exception mid-step saves nothing: the step
        # would be half done)
        if trainer.step != last_saved:
            trainer.save()
    finally:
        monitor.close()
    return run_dir
