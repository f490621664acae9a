"""Training configuration: typed dataclasses with defaults, loaded from a preset or a YAML file
and overridden by ``--key=value`` (``--section.key=value``, or ``--key=value`` when the key name
is unique across sections). Every value is checked; an error names the key and what to do.

Presets: ``tiny`` (tests: 16 px, a few steps), ``demo-cpu`` (synthetic 32 px, fits 2 CPU
cores), ``imagenet-128`` (BigGAN-128 sizes, batch 256 per GPU).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastinv.errors import FastinvError
from fastinv.io import atomic_write_text


class ConfigError(FastinvError, ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class DataConfig:
    root: str | None = None  # ImageFolder with train/ (and val/); None: make the synthetic set
    resolution: int = 32  # G's output and D's input size
    batch_size: int = 32  # per rank, per micro-batch
    backend: str = "auto"  # loader backend: auto | dali | pil
    workers: int | None = None  # PIL loader processes (None: the loader's default, 0: inline)
    synthetic_n: int = 2000  # images in the synthetic set made when root is None
    seed: int = 0
    # Training crops keep a random fraction in [crop_min_scale, 1] of the image area. G learns
    # to draw what D sees: crops of a small shape, where evaluation shows whole images.
    crop_min_scale: float = 0.35
    # decode the split once and serve batches from RAM (whole images + flips; needs
    # crop_min_scale=1): the demo's data decoded every epoch costs more than its small GAN step
    in_memory: bool = False


@dataclass
class ClassifierSection:
    spec: str = "fastinv:small_resnet"
    weights: str | None = None
    random_init: bool = False  # tests only: an untrained classifier
    num_classes: int | None = None
    # "D feature network": another classifier (its weights; spec "" = the same spec as Φ's)
    # whose maps D reads in place of Φ's (model.d_phi_layer picks them). Φ still gives the
    # logits G inverts and D's projection reads; only what D looks at changes. None = Φ's maps
    d_net_weights: str | None = None
    d_net_spec: str = ""


@dataclass
class ModelConfig:
    g_ch: int = 32
    d_ch: int = 32
    noise_dim: int = 120
    shared_dim: int = 128
    attention_resolution: int = 0  # 0: no self-attention
    logit_preprocess: str = "none"  # none (the paper) | affine | standardise | temperature
    logit_temperature: float = 1.0
    cross_replica_bn: bool = False  # sync G's batch norm statistics over ranks
    layers: str = "fastinv"  # fastinv (fused SN / CBN kernels) | torch (torch's own layers)
    # D's pooling of its last feature map: "sum" (BigGAN) grows D's outputs with the map's
    # area (8x8 at 32 px: |D| of 20-45 at init, a saturated hinge); "mean" keeps them O(1).
    d_pool: str = "sum"
    # "Φ-feature D": the name of a module inside Φ (e.g. "features.19" of the demo's SmallCNN)
    # whose output D also reads, at the trunk resolution that matches it; "auto" = Φ's deepest
    # module with a map of one of D's trunk sizes; "auto:each" = the deepest module of each
    # trunk size (for the demo's SmallCNN at 32 px: features.12 at 16 px, features.19 at 8 px);
    # several comma-separated names: one map each (e.g. "features.12,features.19"); "" = off
    # (the paper)
    d_phi_layer: str = ""
    # "minibatch std": D's last block also reads the std of its features over groups of this
    # many images (StyleGAN's layer), so a G that ignores its noise is visible to D; 0 = off
    d_mbstd: int = 0
    # "conditioned G input": G's input linear layer reads the logit embedding beside the noise
    # (BigGAN-deep), not only the batch norms; False = BigGAN
    g_cond_input: bool = False
    # "MLP logit embedding": G embeds the logits with linear -> ReLU -> linear, not one linear
    # map (models/generator.py: shared_mlp); False = BigGAN
    g_shared_mlp: bool = False
    # "narrow full-resolution blocks": the channels of G's last block and D's first, the two
    # that run at the image's resolution (at 32 px ~3/4 of G's and ~60% of D's multiply-adds);
    # 0 = BigGAN's (ch x the architecture table's multiplier)
    g_full_res_ch: int = 0
    d_full_res_ch: int = 0
    # "space-to-depth D input": D reads each 2 x 2 pixel block as 12 channels at half the
    # resolution (pixel_unshuffle) and its first block does not pool: every pixel is read,
    # with no convolution at full resolution (models/discriminator.py)
    d_space_to_depth: bool = False
    bn_eps: float = 1e-5
    sn_eps: float = 1e-6


@dataclass
class OptimConfig:
    g_lr: float = 1e-4
    d_lr: float = 4e-4
    beta1: float = 0.0
    beta2: float = 0.999
    adam_eps: float = 1e-6
    d_steps: int = 2  # D updates per G update
    accumulate: int = 1  # micro-batches per update
    ema_decay: float = 0.9999
    ema_start: int = 1000  # before this G step the EMA copies G
    # "standing statistics" (BigGAN): before the EMA G is saved (and drawn in the image grids),
    # its batch norms' running statistics are recomputed for its own weights over this many
    # batches of training logits (fastinv.train.ema.standing_statistics); 0 = keep the live
    # G's, which it copies every step
    ema_standing_batches: int = 16
    # "lr decay": from this fraction of run.steps on, both learning rates fall linearly to 0 at
    # the last step (a pure function of the step, so a resumed run follows the same schedule);
    # 1 = constant learning rates (the paper's schedule)
    lr_decay_from: float = 1.0
    # Options beyond the paper's GAN-only inverter (0 / "" = off, the paper's recipe); a run's
    # report names the ones it used and bench_quality measures each one's effect.
    # "logit consistency": λ of mean over logits of (pre(Φ(G(z, ε))) - pre(z))², pre = the
    # model's logit_preprocess (affine: each logit in units of its training-set std)
    aux_logit_weight: float = 0.0
    recon_weight: float = 0.0  # "pixel reconstruction": λ of mean |G(Φ(x), ε) - x| (L1)
    diffaug: str = ""  # "D augmentation": DiffAugment policy, e.g. "translation,cutout"
    # "within-class head on whole images": each image D sees gets diffaug's cutout with this
    # probability (1: every image, DiffAugment's own), and the within-class head's term (D's on
    # reals, G's on its fakes) averages over the images left whole. A hole of half the side
    # hides most of a shape and with it the size (RESULTS.md Demo round 32): that term learns
    # and asks for the size where it can be seen; the real/fake score and the class part of
    # the head keep the cutout's regularisation on the rest. At 0.5 (the demo's default
    # preset) G draws some of the size at no judge cost on the default data; on --quick's
    # 2,500 steps it cost 0.07 (RESULTS.md Demo round 33)
    cutout_p: float = 1.0
    # "consistency augmentation": the logit-consistency term reads Φ on G's image under these
    # transforms (same policy names as diffaug), so G cannot satisfy Φ with a pattern that only
    # works at one alignment
    aux_augment: str = ""
    # "Φ feature statistics" (fastinv/train/feature_stats.py): λ of the relative squared error
    # between the per-channel spatial mean and std of Φ's feature maps on G(Φ(x), ε) and on x,
    # at the layers named (comma-separated) or "auto" (the last map of each size in Φ)
    phi_stats_weight: float = 0.0
    phi_stats_layers: str = "auto"
    # "mismatched-logit D" (GAN-CLS, Reed et al. 2016): D also sees each real image paired with
    # the logits of a real image of another Φ class and must score it fake (hinge, weight λ),
    # so D's score depends on whether image and logits belong together, not only on realism
    mismatch_weight: float = 0.0
    # whose logits the mismatched pairs take: "other_class" (GAN-CLS, above) or "same_class"
    # (another image of the same Φ class: D must read what the logits say beyond the class)
    mismatch_pairs: str = "other_class"
    # "D logit head" (ACGAN-style): D gets a linear head on its pooled feature that regresses
    # the preprocessed logits of real images (weight λ in D's loss); G is asked (weight λ) that
    # the head reads z's logits in G(z, ε)
    d_head_weight: float = 0.0
    # the head's loss: "mse" regresses the preprocessed logits; "ce" is ACGAN's own form, a
    # softmax cross-entropy against Φ's top-1 class (the head's outputs are class scores)
    d_head_loss: str = "mse"
    # "detached D logit head": in D's update the head's loss trains the head alone (its gradient
    # stops at D's pooled feature), so D's trunk is shaped by the real/fake score only. With the
    # head's gradient in the trunk, a fresh D could not tell the recipe's fakes from real images
    # in 200 steps (loss_d 1.6 against 0.66 without the head; RESULTS.md round 11)
    d_head_detach: bool = False
    # "within-class head": λ of a second target of the D logit head, each logit's deviation from
    # its Φ class's mean in units of that class's std (Discriminator.within_class), in D's loss
    # on real images and in G's. Beyond the class the logits carry little variance (~8% of the
    # standardised logits' on the synthetic shapes): the plain head's error, and so G's
    # pressure, is almost all class; this term gives the rest (the size) the class's weight.
    # It moves G only where D's augmentation leaves the size readable: with DiffAugment's cutout
    # (half the side) the head reads nothing of it; with optim.diffaug=translation G draws the
    # size, at 0.03-0.05 of judge agreement (RESULTS.md Demo round 32); on the images the
    # cutout leaves whole (optim.cutout_p 0.5) at none on the default data (Demo round 33);
    # λ 2 (the demo's default preset) draws it more than 1 or 4 (Demo round 34)
    d_head_within_weight: float = 0.0
    # "mode seeking" (MSGAN, Mao et al. 2019): λ of 1 / (image distance / noise distance) for
    # two noise draws of the same logits (half the batch once more through G), against G
    # drawing one image per class whatever the noise
    mode_seeking_weight: float = 0.0
    # R1 penalty on D at real images (fastinv/train/regularizers.py), lazy: γ·k every k-th D
    # step (StyleGAN2); with Φ-feature D the pixel gradient runs through Φ's taps too. 0 = off.
    # The demo-cpu preset's γ 0.3: slower early, ahead at 5,000 steps (RESULTS.md round 15)
    r1_gamma: float = 0.0
    r1_every: int = 16
    # One G forward per step instead of two: D's fakes are images G's update drew anyway, not a
    # draw of their own without gradients. "same": this step's (drawn before D's update, as
    # pix2pix / CycleGAN do; G's gradient then comes from a D just trained to reject those very
    # images); "previous": the last step's (one G update old; G's gradient comes from images D
    # has not seen); "previous_seen": those images as G's update saw them, augmented and with
    # the D feature network's maps that forward computed (no second augmentation and feature
    # pass on the fakes in D's update). "off": the usual second draw. Needs d_steps =
    # accumulate = 1.
    reuse_fakes: str = "off"
    # "Φ gradient to G": the scale of G's gradient through the Φ maps D reads (Φ-feature D).
    # 1 = all of it; 0 = none (D still reads Φ's maps, G learns only through D's own trunk and
    # head): at 0 G learns nothing, judge at chance (RESULTS.md round 17), an ablation only
    g_phi_grad: float = 1.0
    # "Φ-map dropout": each image D scores in training has Φ's maps zeroed with this
    # probability (in D's and G's updates), so D's own trunk has to judge it alone
    d_phi_dropout: float = 0.0
    # "class consistency": λ of the cross-entropy between the D feature network's logits on
    # G's image as D sees it (the network whose maps D reads: classifier.d_net_weights, or Φ)
    # and Φ's class of the logits G was given. Those logits come from the forward that gives
    # D its maps, so the term costs no extra network pass; needs model.d_phi_layer
    class_weight: float = 0.0
    # "feature-network logit matching": λ of the squared distance between the D feature
    # network's logits on G's image and on x, the real image whose Φ logits G was given (both
    # under the same D augmentation), over the variance of the latter in the batch. Class
    # consistency asks for Φ's class only; this asks for what that network reads beyond it
    # (a shape's size, which the logits carry and G does not draw). G still sees only Φ's
    # logits: it can learn no more than what they predict of x. One extra no-grad pass of
    # that network over the reals; needs model.d_phi_layer
    dnet_match_weight: float = 0.0


@dataclass
class RunConfig:
    out_dir: str = "runs/inverter"
    steps: int = 1000  # G updates
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # none | bf16 (autocast) | auto: bf16 where the device computes it natively (a GPU, or a
    # CPU with AVX512-BF16 / AMX), float32 elsewhere (fastinv/train/precision.py)
    amp: str = "none"
    channels_last: bool = False
    cudnn_benchmark: bool = True
    compile: bool = False  # torch.compile G and D
    log_every: int = 50
    image_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False  # continue from the newest checkpoint in out_dir
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": {
        "data": dict(resolution=16, batch_size=8, synthetic_n=48, backend="pil", workers=0),
        "classifier": dict(random_init=True, num_classes=4),
        "model": dict(g_ch=4, d_ch=4, noise_dim=12, shared_dim=8),
        "optim": dict(d_steps=1, ema_start=2, ema_decay=0.9),
        "run": dict(steps=6, device="cpu", log_every=2, image_every=3, ckpt_every=3,
                    progress=False, out_dir="runs/tiny"),
    },
    # 2 CPU cores: a few thousand steps. Measured on the demo's 10 classes (benchmarks/
    # RESULTS.md, bench_quality.py): the paper's GAN alone stays at chance for the independent
    # judge there; standardised logits, D mean pooling, DiffAugment, a faster Adam (1e-3, β1
    # 0.5) and D reading Φ's last feature map (Φ-feature D) are what moved it. The
    # logit-consistency term is off: G met it with a patch Φ's max pooling reads (judge 0.19
    # with it, 0.31 without, 2,000 steps, Φ-feature D on). D reads two Φ maps (auto:each: judge
    # 0.32 vs 0.23 for one, 3 seeds) and has a logit head (ACGAN-style, MSE: 0.39 vs 0.27 over
    # 5 seeds, better on each). Those were the 8-18 px shapes of rounds 1-11; on today's
    # 16-24 px shapes the recipe without mode seeking reached 0.57-0.65 at 2,000 steps, 0.49
    # without the head and 0.12 without Φ-feature D (round 12). bench_quality ablates each
    # option.
    "demo-cpu": {
        "data": dict(resolution=32, batch_size=16, synthetic_n=2000, crop_min_scale=1.0,
                     in_memory=True),
        "model": dict(g_ch=8, d_ch=8, noise_dim=64, shared_dim=64, attention_resolution=0,
                      logit_preprocess="affine", d_pool="mean", d_phi_layer="auto:each"),
        "optim": dict(g_lr=1e-3, d_lr=1e-3, beta1=0.5, d_steps=1, ema_start=300,
                      ema_decay=0.99, diffaug="translation,cutout", d_head_weight=1.0,
                      # "mode seeking" (MSGAN): the per-class collapse breaks (noise now varies
                      # colours, backgrounds, pose), KID 115 / 206 vs 416 / 520, judge 0.775 /
                      # 0.701 vs 0.648 / 0.734 at 3,000 steps on 2 seeds (round 12); 1.25x a step
                      mode_seeking_weight=1.0,
                      # D's fakes are the last G update's images: one G forward a step, 1.12x
                      # the img/s of the demo's two 1-thread jobs, judge 0.789 / 0.803 against
                      # 0.775 / 0.701 without at 3,000 steps (2 seeds, RESULTS.md round 14);
                      # as that update's D saw them, with the D feature network's maps of
                      # that forward: its augmentation and pass on 16 images, 2.7-4.2 ms of a
                      # 74-101 ms step, are not run again (RESULTS.md Demo round 26)
                      reuse_fakes="previous_seen",
                      # R1 (through Φ's taps too): slower early, but the late class swings
                      # damped: judge 0.881 / 0.859 at 5,000 steps against 0.852 / 0.645
                      # without (2 seeds, RESULTS.md round 15)
                      r1_gamma=0.3),
        # amp auto: bf16 autocast on a CPU with AVX512-BF16 / AMX (1.37x per step, the same
        # judge agreement on two seeds: RESULTS.md round 11), float32 elsewhere.
        # channels_last: oneDNN's bf16 convolutions copy NCHW tensors in and out; in
        # channels_last the demo's two 1-thread jobs run 1.40x / 1.64x the NCHW img/s
        # (RESULTS.md issue 11 round 12)
        "run": dict(steps=1000, device="cpu", amp="auto", channels_last=True, log_every=25,
                    image_every=250, ckpt_every=250, out_dir="runs/demo-cpu"),
    },
    "imagenet-128": {
        "data": dict(resolution=128, batch_size=256, backend="auto"),
        "classifier": dict(spec="torchvision:resnet50"),
        "model": dict(g_ch=96, d_ch=96, noise_dim=120, shared_dim=128, attention_resolution=64,
                      cross_replica_bn=False),
        "optim": dict(g_lr=1e-4, d_lr=4e-4, d_steps=2, ema_start=20000, ema_decay=0.9999),
        "run": dict(steps=150000, device="cuda", amp="bf16", channels_last=True, log_every=100,
                    image_every=2000, ckpt_every=2000, out_dir="runs/imagenet-128"),
    },
}


def inverter_options(cfg: TrainConfig) -> dict[str, float | str]:
    """The options beyond the paper's GAN-only inverter that ``cfg`` turns on, by name."""
    o, m = cfg.optim, cfg.model
    named = {"logit consistency": o.aux_logit_weight, "pixel reconstruction": o.recon_weight,
             "D augmentation": o.diffaug, "consistency augmentation": o.aux_augment,
             "R1": o.r1_gamma,
             "logit preprocessing": "" if m.logit_preprocess == "none" else m.logit_preprocess,
             "D pooling": "" if m.d_pool == "sum" else m.d_pool,
             "Φ-feature D": m.d_phi_layer,
             "D feature network": Path(cfg.classifier.d_net_weights).stem
             if cfg.classifier.d_net_weights else "",
             "Φ feature statistics": o.phi_stats_weight,
             "mismatched-logit D": (f"{o.mismatch_weight:g} (same class)"
                                    if o.mismatch_weight and o.mismatch_pairs == "same_class"
                                    else o.mismatch_weight),
             "D logit head": o.d_head_weight, "within-class head": o.d_head_within_weight,
             "within-class head on whole images": (f"cutout p {o.cutout_p:g}"
                                                   if o.cutout_p < 1 else ""),
             "mode seeking": o.mode_seeking_weight, "minibatch std": m.d_mbstd,
             "conditioned G input": m.g_cond_input, "MLP logit embedding": m.g_shared_mlp,
             "narrow full-resolution blocks": ", ".join(
                 f"{net} {ch} channels" for net, ch in (("G", m.g_full_res_ch),
                                                         ("D", m.d_full_res_ch)) if ch),
             "space-to-depth D input": m.d_space_to_depth,
             # both need model.d_phi_layer (_check refuses them without it)
             "Φ gradient to G": f"x{o.g_phi_grad:g}" if o.g_phi_grad < 1 else "",
             "Φ-map dropout": o.d_phi_dropout,
             "class consistency": o.class_weight,
             "feature-network logit matching": o.dnet_match_weight,
             "lr decay": f"linear from {o.lr_decay_from:g} of the run" if o.lr_decay_from < 1
             else ""}
    if o.d_head_weight and (o.d_head_loss != "mse" or o.d_head_detach):  # not the default form
        form = f" ({o.d_head_loss})" if o.d_head_loss != "mse" else ""
        named["D logit head"] = f"{o.d_head_weight:g}{form}" + (", detached" if o.d_head_detach
                                                                 else "")
    return {k: v for k, v in named.items() if v}


def _resolve(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value, hint, key: str):
    """Convert ``value`` (YAML value or command-line string) to the field type ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = hint(float(value)) if hint is int and isinstance(value, str) and "e" in value.lower() else hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {'an integer' if hint is int else 'a number'}, "
                              f"got {value!r}") from None
        if hint is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:  # tuple[float, float, float]: "0.5,0.5,0.5" or a YAML list
        items = value.split(",") if isinstance(value, str) else list(value)
        kinds = typing.get_args(hint)
        if len(items) != len(kinds):
            raise ConfigError(f"{key} takes {len(kinds)} comma-separated values, got {value!r}")
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, k, key)
                     for v, k in zip(items, kinds))
    return value


def _apply(cfg: TrainConfig, section: str, key: str, value, source: str) -> None:
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}; sections are {sorted(sections)}")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; {section} has "
                          f"{sorted(hints)}")
    setattr(sub, key, _coerce(value, hints[key], f"{section}.{key}"))


def _merge(cfg: TrainConfig, tree: dict, source: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of key: value")
        for key, value in values.items():
            _apply(cfg, section, key, value, source)


def _locate(key: str) -> tuple[str, str]:
    """``section.key`` as given, or the one section that has ``key``."""
    if "." in key:
        section, _, name = key.partition(".")
        return section, name
    owners = [f.name for f in dataclasses.fields(TrainConfig)
              if key in typing.get_type_hints(_resolve(TrainConfig, f.name))]
    if not owners:
        raise ConfigError(f"unknown config key {key!r}; run `fastinv train --print-config` to see "
                          "every key")
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is in several sections {owners}; write "
                          f"--{owners[0]}.{key}=...")
    return owners[0], key


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --key=value or --section.key=value")
        key, _, value = text.partition("=")
        section, name = _locate(key.strip())
        _apply(cfg, section, name, value.strip(), f"override {item!r}")
    return cfg


def apply_field_overrides(obj, overrides: list[str]) -> None:
    """``--key=value`` overrides of a flat config dataclass (``ClassifierConfig``): the syntax
    of ``fastinv train``'s overrides, one key per field (``--batch_size=64``; a dash in the
    key counts as an underscore), values converted to the field's type."""
    hints = typing.get_type_hints(type(obj))
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --key=value")
        key, _, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if key not in hints:
            raise ConfigError(f"unknown key {key!r}; the keys are {sorted(hints)}")
        setattr(obj, key, _coerce(value.strip(), hints[key], key))


def load_config(path_or_preset: str | Path | None = None, overrides: list[str] | None = None
                ) -> TrainConfig:
    """A validated TrainConfig from a preset name or YAML path (None: defaults), then overrides."""
    cfg = base_config(path_or_preset)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def base_config(path_or_preset: str | Path | None = None) -> TrainConfig:
    """The TrainConfig of a preset name or YAML path, NOT validated: for code that sets typed
    fields on it (the demo sets data, classifier and paths) and then calls ``validate``."""
    cfg = TrainConfig()
    if path_or_preset is not None:
        name = str(path_or_preset)
        if name in PRESETS:
            _merge(cfg, PRESETS[name], f"preset {name}")
        else:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"config {name!r} is neither a preset ({sorted(PRESETS)}) nor "
                                  "an existing YAML file")
            try:
                tree = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
            _merge(cfg, tree, str(path))
    return cfg


def from_dict(tree: dict) -> TrainConfig:
    cfg = TrainConfig()
    _merge(cfg, tree, "saved config")
    return cfg


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Check every field of ``cfg`` (ConfigError with the fix on the first bad one).

    Every entry point calls this (``load_config``, ``train_inverter``, ``InverterTrainer``), so
    a hand-built config is checked too; the checks themselves run once per config content: a
    config already validated and not changed since returns at once."""
    seen = repr(cfg)
    if cfg.__dict__.get("_validated") == seen:
        return
    _check(cfg)
    cfg.__dict__["_validated"] = seen


def _check(cfg: TrainConfig) -> None:
    from fastinv.models.generator import G_ARCH
    from fastinv.models.layers import LOGIT_PREPROCESS
    from fastinv.train.augment import CUTOUT_RATIO, parse_policy
    from fastinv.train.precision import AMP_MODES

    d, c, m, o, r = cfg.data, cfg.classifier, cfg.model, cfg.optim, cfg.run
    _require(not m.cross_replica_bn or m.layers == "fastinv",
             "model.cross_replica_bn synchronises fastinv's batch norms (gloo on CPU, NCCL on "
             "GPU): it needs model.layers=fastinv, torch's layers would ignore it")
    _require(d.resolution in G_ARCH, f"data.resolution must be one of {sorted(G_ARCH)}, "
             f"got {d.resolution}")
    _require(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _require(d.backend in ("auto", "dali", "pil"), f"data.backend must be auto, dali or pil, "
             f"got {d.backend!r}")
    _require(0 < d.crop_min_scale <= 1, f"data.crop_min_scale must be in (0, 1], "
             f"got {d.crop_min_scale}")
    _require(not d.in_memory or d.crop_min_scale == 1, "data.in_memory=true serves whole images: "
             "set --data.crop_min_scale=1 (or data.in_memory=false for random crops)")
    _require(d.root is not None or d.synthetic_n >= d.batch_size,
             "data.synthetic_n must be at least data.batch_size")
    _require(":" in c.spec, f"classifier.spec must look like kind:name, got {c.spec!r}")
    _require(c.random_init or c.weights is not None or c.spec.startswith("torchscript:"),
             f"classifier {c.spec!r} needs weights: pass --classifier.weights=PATH "
             "(or --classifier.random_init=true for tests)")
    for name in ("g_ch", "d_ch", "noise_dim", "shared_dim"):
        _require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    for name in ("g_full_res_ch", "d_full_res_ch"):
        _require(getattr(m, name) >= 0, f"model.{name} must be >= 0 (0: BigGAN's width), "
                 f"got {getattr(m, name)}")
    _require(m.attention_resolution == 0 or m.attention_resolution in (8, 16, 32, 64, 128, 256)
             and m.attention_resolution <= d.resolution,
             f"model.attention_resolution must be 0 or a power of two from 8 to data.resolution, "
             f"got {m.attention_resolution}")
    _require(m.logit_preprocess in LOGIT_PREPROCESS, f"model.logit_preprocess must be one of "
             f"{LOGIT_PREPROCESS}, got {m.logit_preprocess!r}")
    _require(m.logit_temperature > 0, "model.logit_temperature must be > 0")
    _require(m.layers in ("fastinv", "torch"), f"model.layers must be fastinv or torch, "
             f"got {m.layers!r}")
    _require(m.d_mbstd == 0 or (m.d_mbstd >= 2 and d.batch_size % m.d_mbstd == 0),
             f"model.d_mbstd must be 0 (off) or a group size >= 2 that divides data.batch_size "
             f"({d.batch_size}), got {m.d_mbstd}")
    _require(m.d_pool in ("sum", "mean", "sqrt"), f"model.d_pool must be sum, mean or sqrt, "
             f"got {m.d_pool!r}")
    for name in ("diffaug", "aux_augment"):
        try:
            parse_policy(getattr(o, name))
        except ValueError as exc:
            raise ConfigError(f"optim.{name}: {exc}") from None
    _require(0 < o.cutout_p <= 1, f"optim.cutout_p must be in (0, 1], got {o.cutout_p}")
    _require(o.cutout_p == 1 or any(p in CUTOUT_RATIO for p in parse_policy(o.diffaug)),
             f"optim.cutout_p < 1 needs a cutout in optim.diffaug, got {o.diffaug!r}")
    _require(o.cutout_p == 1 or o.d_head_within_weight > 0,
             "optim.cutout_p < 1 is for the within-class head (optim.d_head_within_weight > 0)")
    _require(o.recon_weight >= 0, "optim.recon_weight must be >= 0")
    _require(o.phi_stats_weight >= 0, "optim.phi_stats_weight must be >= 0")
    _require(o.mismatch_weight >= 0, "optim.mismatch_weight must be >= 0")
    _require(o.mismatch_pairs in ("other_class", "same_class"),
             f"optim.mismatch_pairs must be other_class or same_class, got {o.mismatch_pairs!r}")
    _require(o.d_head_weight >= 0, "optim.d_head_weight must be >= 0")
    _require(o.mode_seeking_weight >= 0, "optim.mode_seeking_weight must be >= 0")
    _require(o.d_head_within_weight >= 0, "optim.d_head_within_weight must be >= 0")
    _require(o.d_head_within_weight == 0 or o.d_head_weight > 0,
             "optim.d_head_within_weight needs the D logit head (optim.d_head_weight > 0)")
    _require(o.d_head_loss in ("mse", "ce"), f"optim.d_head_loss must be mse or ce, "
             f"got {o.d_head_loss!r}")
    _require(bool(o.phi_stats_layers.strip()), "optim.phi_stats_layers must name layers or be auto")
    _require(o.r1_gamma >= 0 and o.r1_every >= 1, "optim.r1_gamma must be >= 0 and "
             "optim.r1_every >= 1")
    _require(o.g_lr > 0 and o.d_lr > 0, "optim.g_lr and optim.d_lr must be > 0")
    _require(0 <= o.lr_decay_from <= 1, "optim.lr_decay_from must be in [0, 1] (1 = no decay)")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and beta2 must be in [0, 1)")
    _require(o.d_steps >= 1 and o.accumulate >= 1, "optim.d_steps and optim.accumulate must be >= 1")
    _require(0.0 <= o.d_phi_dropout < 1.0, f"optim.d_phi_dropout must be in [0, 1), got "
             f"{o.d_phi_dropout}")
    _require(0.0 <= o.g_phi_grad <= 1.0, f"optim.g_phi_grad must be in [0, 1], got "
             f"{o.g_phi_grad}")
    # both act on the Φ maps D reads: without them they would change nothing, silently
    _require(bool(cfg.model.d_phi_layer) or (o.g_phi_grad == 1 and o.d_phi_dropout == 0),
             "optim.g_phi_grad and optim.d_phi_dropout act on the Φ maps D reads: set "
             "model.d_phi_layer (e.g. auto:each) or leave them at 1 and 0")
    for name in ("class_weight", "dnet_match_weight"):
        _require(getattr(o, name) >= 0, f"optim.{name} must be >= 0, got {getattr(o, name)}")
        _require(getattr(o, name) == 0 or bool(cfg.model.d_phi_layer),
                 f"optim.{name} reads the logits of the network whose maps D reads: set "
                 "model.d_phi_layer (e.g. auto:each) too")
    _require(not cfg.classifier.d_net_weights or bool(cfg.model.d_phi_layer),
             "classifier.d_net_weights names the network whose maps D reads: set "
             "model.d_phi_layer (e.g. auto:each) too")
    _require(o.reuse_fakes in ("off", "same", "previous", "previous_seen"),
             f"optim.reuse_fakes must be off, same, previous or previous_seen, "
             f"got {o.reuse_fakes!r}")
    _require(o.reuse_fakes == "off" or o.d_steps == 1 and o.accumulate == 1,
             f"optim.reuse_fakes={o.reuse_fakes} feeds one G draw to one D update: it needs "
             f"optim.d_steps=1 and optim.accumulate=1 (got {o.d_steps} and {o.accumulate})")
    _require(0 <= o.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    _require(o.ema_standing_batches >= 0,
             f"optim.ema_standing_batches must be >= 0, got {o.ema_standing_batches}")
    _require(o.ema_start >= 0 and o.aux_logit_weight >= 0,
             "optim.ema_start and optim.aux_logit_weight must be >= 0")
    _require(r.steps >= 1, f"run.steps must be >= 1, got {r.steps}")
    _require(r.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, "
             f"got {r.device!r}")
    _require(r.amp in AMP_MODES, f"run.amp must be one of {AMP_MODES}, got {r.amp!r}")
    for name in ("log_every", "image_every", "ckpt_every", "keep_checkpoints"):
        _require(getattr(r, name) >= 1, f"run.{name} must be >= 1")
