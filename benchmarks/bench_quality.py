"""Inverter quality against training steps and wall-clock seconds, for the demo's CPU recipe
and for each of its options switched off (the ablation rows), with the logit-space nearest
neighbour as the reference line.

    python benchmarks/bench_quality.py --preset default --work runs/bench_quality
    fastinv bench quality --preset quick          # the same through the CLI
    pytest benchmarks/bench_quality.py            # a seconds-long smoke run (tiny preset)

The data, the standard classifier Φ, the judge (another architecture and seed, trained only on
real images) and the factor regressor are made once in ``--work`` and reused. Each
configuration trains an inverter with a checkpoint every ``--eval-every`` steps; every
checkpoint's EMA generator is scored on the same held-out images:

  judge      judge(x̂) = x's true class (the headline: Φ itself can be fooled)
  Φ agree    Φ(x̂) top-1 = Φ(x) top-1
  logit cos  cosine of Φ(x̂) and Φ(x)
  KID        in the judge's feature space, against real held-out images (lower: more real)
  factor R²  mean R² of the factor regressor over the nuisance factors (colours, texture,
             position, scale, rotation) read off x̂ against x's factors
  judge best-of-k  judge agreement with Φ-consistent sampling (fastinv/invert/selection.py:
             k noise draws per image, the one Φ reads closest to the logits kept; k = the
             preset's ``evaluation.select_k``): the option's effect, measured on the same G

Seconds are the wall clock of the training run up to the checkpoint (its file time minus the
run's config.yaml time), so they include everything ``fastinv train`` does per step. Configs
run one after another: never time two things at once on a small machine.

With ``--seeds N`` every configuration trains N times (``--run.seed`` 0..N-1: G/D init and
noise). The summary table then gives, at the last checkpoint, each config's judge agreement
averaged over seeds with its range, and the difference to the recipe with a paired bootstrap
95% interval over the held-out images (of the seed-averaged per-image values): one run of a GAN
on 2 CPU cores moves by about ±0.1 in judge agreement from seed to seed, so a single-seed
difference says little.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastinv import demo

# the demo's within-class head on whole images (demo.SIZE_HEAD) with what it needs on a preset
# that lacks it (--quick): the D logit head and DiffAugment's cutout
WHOLE_IMAGES_HEAD = ("--optim.d_head_weight=1", "--optim.diffaug=translation,cutout",
                     *demo.SIZE_HEAD)

# name -> overrides on top of the preset's recipe; "recipe" is the preset as shipped, "paper"
# the GAN alone on raw logits with BigGAN's sum pooling (every option off)
ABLATIONS = {
    "recipe": (),
    # D also reads Φ's deepest feature map of each of its trunk sizes (for the demo's SmallCNN
    # at 32 px: the last 16 px map and the final ReLU, the 8 px map Φ max-pools): off, or only
    # the deepest map
    "no Φ-feature D": ("--model.d_phi_layer=", "--classifier.d_net_weights=",
                       "--optim.class_weight=0"),
    "one Φ map": ("--model.d_phi_layer=auto",),
    # D reads the robust classifier's maps (the demo's D feature network): Φ's own instead
    "D reads Φ's maps": ("--classifier.d_net_weights=",),
    # G asked that the D feature network reads Φ's class in its image (cross-entropy): off
    "no class consistency": ("--optim.class_weight=0",),
    "no D augmentation": ("--optim.diffaug=", "--optim.cutout_p=1"),
    "raw logits": ("--model.logit_preprocess=none",),
    # an option the recipe does not use, measured on top of it (λ 1)
    "+ logit consistency": ("--optim.aux_logit_weight=1",),
    "+ mismatched-logit D": ("--optim.mismatch_weight=1",),
    # the mismatched pairs from another image of the same class: D must read the logits
    # beyond the class (what the factor R² of scale asks of G)
    "+ same-class mismatched-logit D": ("--optim.mismatch_weight=1",
                                        "--optim.mismatch_pairs=same_class"),
    # the D logit head (ACGAN-style): off, and in ACGAN's cross-entropy form instead of MSE
    "no D logit head": ("--optim.d_head_weight=0", "--optim.d_head_within_weight=0",
                        "--optim.cutout_p=1"),
    "D logit head as cross-entropy": ("--optim.d_head_loss=ce",),
    "+ detached D logit head": ("--optim.d_head_detach=true",),
    # the head also regresses each logit's deviation from its Φ class's mean in that class's
    # stds: the logits' part beyond the class (the size) weighs as much as the class in the
    # head's loss and in G's (the head at the CPU presets' weight: tiny has none)
    "+ within-class head": ("--optim.d_head_weight=1", "--optim.d_head_within_weight=1",
                            "--optim.cutout_p=1"),
    # DiffAugment's 16 px cutout hides much of a 32 px shape: without it (and with the
    # within-class head) G draws the size the logits carry (Demo round 32)
    "no cutout": ("--optim.diffaug=translation", "--optim.cutout_p=1"),
    "+ within-class head, no cutout": ("--optim.d_head_weight=1", "--optim.d_head_within_weight=1",
                                       "--optim.diffaug=translation", "--optim.cutout_p=1"),
    # half the images cut out, the within-class term on the whole ones only: the size where
    # D can see it, cutout's regularisation on the rest (Demo round 33; the default preset's
    # recipe has it, this row adds it to --quick's); and the default's recipe without it
    "+ within-class head on whole images": WHOLE_IMAGES_HEAD,
    "no within-class head": ("--optim.d_head_within_weight=0", "--optim.cutout_p=1"),
    # the same option at half the default's weight (round 33's 1; Demo round 34): on every
    # preset the whole-images row with only the weight changed
    "within-class head on whole images at weight 1": (*WHOLE_IMAGES_HEAD,
                                                      "--optim.d_head_within_weight=1"),
    # G's input linear layer reads the logit embedding (BigGAN-deep) / a two-layer logit
    # embedding, measured on top of the recipe
    "+ conditioned G input": ("--model.g_cond_input=true",),
    "+ MLP logit embedding": ("--model.g_shared_mlp=true",),
    # G also asked that the D feature network reads the same logits in its image as in the
    # real image whose Φ logits it was given (what that network reads beyond the class)
    "+ feature-network logit matching": ("--optim.dnet_match_weight=1",),
    # G's last block and D's first (the two at full resolution, most of each one's
    # multiply-adds) at 16 channels instead of 32: cheaper steps, measured on top
    "+ narrow full-resolution blocks": ("--model.g_full_res_ch=16", "--model.d_full_res_ch=16"),
    # D reads each 2 x 2 pixel block as channels at half the resolution: no convolution at
    # full resolution, every pixel read; a float32 step 1.21x faster (Demo round 37)
    "+ space-to-depth D": ("--model.d_space_to_depth=true",),
    # --quick's recipe has it (Demo round 38): that preset's row with it off
    "no space-to-depth D": ("--model.d_space_to_depth=false",),
    # "mode seeking" (MSGAN) against the per-class collapse: off
    "no mode seeking": ("--optim.mode_seeking_weight=0",),
    # D's fakes are the last G update's images (one G forward a step): a draw of their own
    "no fake reuse": ("--optim.reuse_fakes=off",),
    # R1 at the reals (through the tapped maps too), measured on top: the demo's recipe has it
    # off since D reads the robust maps (round 19); the demo-cpu preset's γ
    "+ R1": ("--optim.r1_gamma=0.3",),
    # D reads Φ's maps but G's update gets no gradient through them (round 17: judge at chance)
    "no Φ gradient to G": ("--optim.g_phi_grad=0",),
    # each image's Φ maps zeroed in D with probability 0.5: D's own trunk judges it alone
    "+ Φ-map dropout": ("--optim.d_phi_dropout=0.5",),
    # the preset trains under amp=auto (bf16 autocast where the CPU has AVX512-BF16 / AMX):
    # the same recipe in float32, to show bf16 keeps the quality per step
    "float32": ("--run.amp=none",),
    "paper": ("--optim.aux_logit_weight=0", "--optim.recon_weight=0", "--model.d_phi_layer=",
              "--classifier.d_net_weights=", "--optim.class_weight=0",
              "--optim.r1_gamma=0",
              "--optim.d_head_weight=0", "--optim.d_head_within_weight=0",
              "--optim.cutout_p=1", "--optim.mode_seeking_weight=0",
              "--optim.diffaug=", "--model.logit_preprocess=none", "--model.d_pool=sum"),
}


def prepare(work: Path, preset: str, device: str, phi: str = "standard") -> dict:
    """Data, Φ, judge, evaluation images and factor regressor (cached in ``work``). ``phi``:
    the demo classifier whose logits the inverters invert (``standard`` or ``robust``)."""
    from fastinv.data import load_factors, make_synthetic_dataset
    from fastinv.invert import factors as fac
    from fastinv.models.classifiers import load_classifier

    p = demo.PRESETS[preset]
    if not (work / "data" / "factors.csv").exists():
        make_synthetic_dataset(work / "data", n=p.n_images, resolution=p.resolution, seed=0,
                               val_fraction=p.val_fraction, num_classes=p.num_classes)
    # Φ (standard), the robust classifier (D's feature network in the recipe) and the judge,
    # as the demo trains them; kept in work/classifiers and reused
    weights = demo._train_classifiers(p, work, device, reuse=True)
    if phi not in demo.CLASSIFIERS:
        raise ValueError(f"phi must be one of {demo.CLASSIFIERS}, got {phi!r}")
    clf = load_classifier(f"fastinv:{p.classifiers[phi].arch}", weights=weights[phi]).place(device)
    judge = load_classifier(f"fastinv:{p.classifiers['judge'].arch}", weights=weights["judge"]).place(device)
    val = demo._images(work / "data" / "val", clf, p, p.evaluation.n_eval, device)
    train = demo._images(work / "data" / "train", clf, p, p.n_images, device)
    tf, vf = load_factors(work / "data", split="train"), load_factors(work / "data", split="val")
    y_train, names = fac.factor_targets({k: v[train.index.numpy()] for k, v in tf.items()})
    y_val, _ = fac.factor_targets({k: v[val.index.numpy()] for k, v in vf.items()})
    torch.manual_seed(0)
    regressor = fac.train_factor_regressor(train.images, y_train.to(device),
                                           epochs=p.evaluation.factor_epochs, seed=0)
    # what the logits carry of each factor, read off them directly (the target for scale R²)
    probe, _ = fac.logit_probe(train.logits, y_train, val.logits, y_val, names)
    return dict(p=p, weights=weights, phi=phi, clf=clf, judge=judge, val=val, train=train,
                regressor=regressor, y_val=y_val.to(device), names=names, probe=probe)


@torch.no_grad()
def score(env: dict, decoder, per_image: bool = False) -> dict:
    from fastinv.invert import analyses, quality
    from fastinv.invert.factors import r2_per_factor, within_class_corr
    from fastinv.invert.selection import PhiSelected

    val = env["val"]
    rec = analyses.match_size(analyses.invert(decoder, val.logits, seed=0), val.images)
    values = quality.per_image(env["clf"], env["judge"], rec, val.images, val.labels, val.logits)
    k = max(1, env["p"].evaluation.select_k)
    best = analyses.match_size(analyses.invert(PhiSelected(decoder, env["clf"], k), val.logits,
                                               seed=0), val.images)
    judge_best = quality.per_image(env["clf"], env["judge"], best, val.images, val.labels,
                                   val.logits)["judge_vs_label"]
    pred = env["regressor"].predict(rec)
    r2 = r2_per_factor(pred, env["y_val"], env["names"])
    # does x̂'s size follow x's within Φ's class (R² below 0 cannot tell weakly from not)
    j = env["names"].index("scale") if "scale" in env["names"] else None
    scale_r = float("nan") if j is None else within_class_corr(
        pred[:, j].double().cpu().numpy(), env["y_val"][:, j].double().cpu().numpy(),
        val.logits.argmax(1).cpu().numpy())
    extra = {"judge_per_image": values["judge_vs_label"].tolist()} if per_image else {}
    return {**extra, "judge": values["judge_vs_label"].mean().item(),
            "phi_agree": values["phi_agree"].mean().item(),
            "logit_cos": values["logit_cosine"].mean().item(),
            "kid": quality.realism(env["judge"], val.images, rec)["kid"],
            "factor_r2": sum(r2.values()) / len(r2), "judge_best": judge_best.mean().item(),
            "scale_within_r": scale_r,
            "factor_r2_each": r2}


def run_config(env: dict, work: Path, name: str, overrides: tuple[str, ...], steps: int,
               eval_every: int, device: str, seed: int = 0) -> list[dict]:
    from fastinv.train import checkpoint
    from fastinv.train.checkpoint import load_inverter

    # the robust inverter's runs get their own folders (the standard's keep their old names)
    slug = ("" if env["phi"] == "standard" else f"{env['phi']}_") + name.replace(" ", "_") + (
        f"_seed{seed}" if seed else "")
    run_dir = work / "runs" / slug / "inverter"
    p = env["p"]
    if not checkpoint.list_checkpoints(run_dir):
        extra = (*demo.d_net_overrides(p, env["weights"]),
                 f"--run.steps={steps}", f"--run.ckpt_every={eval_every}",
                 f"--run.keep_checkpoints={steps // eval_every + 1}", "--run.progress=false",
                 f"--run.seed={seed}", *overrides)
        demo._train_inverter(p, work, f"runs/{slug}", env["weights"][env["phi"]], device, extra)
    t0 = (run_dir / "config.yaml").stat().st_mtime
    rows = []
    cks = checkpoint.list_checkpoints(run_dir)
    for ck in cks:
        G, _ = load_inverter(ck, device=device)
        step = int(ck.stem.split("_")[-1])
        # the last checkpoint keeps its per-image judge values for the paired intervals
        rows.append({"config": name, "seed": seed, "step": step,
                     "seconds": ck.stat().st_mtime - t0, **score(env, G, per_image=ck == cks[-1])})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "judge_per_image"}),
              flush=True)
    return rows


def summary(rows: list[dict], baseline: str = "recipe") -> str:
    """At each config's last step: judge over seeds (mean, range), KID, and the judge
    difference to ``baseline`` with a paired bootstrap 95% interval over images."""
    import numpy as np

    from fastinv.invert.stats import bootstrap_diff

    last = {}
    for r in rows:
        if "judge_per_image" in r:
            last.setdefault(r["config"], []).append(r)
    per_image = {c: np.mean([r["judge_per_image"] for r in rs], axis=0) for c, rs in last.items()}
    lines = ["| config | seeds | step | judge mean | judge range | KID mean | judge − "
             f"{baseline} [95% CI over images] | judge best-of-k mean |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for c, rs in last.items():
        j = [r["judge"] for r in rs]
        diff = "–"
        if c != baseline and baseline in per_image:
            iv = bootstrap_diff(per_image[c], per_image[baseline])
            diff = f"{iv.mean:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]"
        lines.append(f"| {c} | {len(rs)} | {rs[0]['step']} | {np.mean(j):.3f} | "
                     f"{min(j):.3f}–{max(j):.3f} | {np.mean([r['kid'] for r in rs]):.1f} | "
                     f"{diff} | {np.mean([r.get('judge_best', np.nan) for r in rs]):.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("judge", "judge agreement (↑)"), ("kid", "KID in judge features (↓)"),
            ("phi_agree", "Φ agreement (↑)"), ("factor_r2", "mean factor R² (↑)"),
            ("judge_best", "judge, best of k draws by Φ (↑)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, (k, title) in zip(axes, keys):
        for name in dict.fromkeys(r["config"] for r in rows):
            by_step: dict[int, list[float]] = {}
            for r in rows:
                if r["config"] == name:
                    by_step.setdefault(r["step"], []).append(r[k])
            steps = sorted(by_step)
            mean = [sum(by_step[t]) / len(by_step[t]) for t in steps]
            line, = ax.plot(steps, mean, marker="o", label=name)
            if any(len(v) > 1 for v in by_step.values()):  # seeds: shade their range
                ax.fill_between(steps, [min(by_step[t]) for t in steps],
                                [max(by_step[t]) for t in steps], color=line.get_color(),
                                alpha=0.2)
        ax.axhline(reference[k], color="k", ls="--", lw=1, label="logit NN (reference)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("G steps")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    from fastinv.io import atomic_savefig

    atomic_savefig(fig, path)
    plt.close(fig)


def table(rows: list[dict], reference: dict, probe: dict | None = None) -> str:
    """The rows, the logit NN's row and (``probe``: R² per factor) the logit probe's factor
    R²s: what the logits carry, with no image model (fastinv.invert.factors.logit_probe)."""
    # scale: the factor the logits carry most (logit probe R² 0.38-0.57, RESULTS.md Demo round 30)
    head = ("| config | seed | step | s | judge | Φ agree | logit cos | KID | factor R² | "
            "scale R² | scale r within class | judge best-of-k |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = "| {config} | {seed} | {step} | {seconds:.0f} | {judge:.3f} | {phi_agree:.3f} | " \
          "{logit_cos:.3f} | {kid:.3f} | {factor_r2:.3f} | {scale:.3f} | {scale_r:.3f} | " \
          "{judge_best:.3f} |"

    def scale(r):
        return r.get("factor_r2_each", {}).get("scale", float("nan"))

    def scale_r(r):  # rows from before the column have none
        return r.get("scale_within_r", float("nan"))

    lines += [fmt.format(scale=scale(r), scale_r=scale_r(r), **r) for r in rows]
    lines.append(fmt.format(config="logit NN (reference)", seed="–", step="–", seconds=0,
                            scale=scale(reference), scale_r=scale_r(reference), **reference))
    if probe:
        lines.append(f"| logit probe (reference: read off the logits) | – | – | – | – | – | – | – "
                     f"| {sum(probe.values()) / len(probe):.3f} | {probe.get('scale', float('nan')):.3f} | – | – |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default", help="demo preset: default | quick | tiny | gpu")
    ap.add_argument("--work", default="runs/bench_quality", help="cache and output folder")
    ap.add_argument("--steps", type=int, default=None, help="G steps (default: the preset's)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between checkpoints")
    ap.add_argument("--configs", default="all",
                    help="comma-separated names of " + ", ".join(ABLATIONS) + " (default all)")
    ap.add_argument("--seeds", type=int, default=1, help="runs per config (--run.seed 0..N-1)")
    ap.add_argument("--phi", default="standard", choices=("standard", "robust"),
                    help="the classifier whose logits are inverted (the demo's two)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.preset not in demo.PRESETS:
        ap.error(f"unknown preset {args.preset!r}; choose from {sorted(demo.PRESETS)}")
    names = list(ABLATIONS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {list(ABLATIONS)}")
    work = Path(args.work)
    t0 = time.perf_counter()
    env = prepare(work, args.preset, args.device, args.phi)
    print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    steps = args.steps or env["p"].inverter.steps
    every = args.eval_every or max(1, steps // 5)
    from fastinv.invert.quality import NearestNeighbour

    reference = score(env, NearestNeighbour(env["train"].logits, env["train"].images))
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    rows = []
    for seed in range(args.seeds):  # seed-major: a stopped run still has every config once
        for name in names:
            rows += run_config(env, work, name, ABLATIONS[name], steps, every, args.device, seed)
    md = table(rows, reference, env["probe"]) + "\n\n" + summary(rows)
    print(md)
    from fastinv.io import atomic_write_text

    atomic_write_text(work / "quality.md", md + "\n")
    atomic_write_text(work / "quality.json", json.dumps(
        {"rows": rows, "reference": reference, "logit_probe": env["probe"]}, indent=2))
    plot(rows, reference, work / "quality.png")
    print(f"wrote {work / 'quality.md'}, quality.json, quality.png", flush=True)
    return 0


def test_quality_benchmark_runs_on_the_tiny_preset(tmp_path):
    """Smoke run: the benchmark's whole path in seconds (no quality asserted)."""
    assert main(["--preset", "tiny", "--work", str(tmp_path), "--steps", "4", "--eval-every", "2",
                 "--configs", "recipe,paper", "--seeds", "2"]) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert {(r["config"], r["seed"]) for r in rows} == {(c, s) for c in ("recipe", "paper")
                                                        for s in (0, 1)}
    md = (tmp_path / "quality.md").read_text()
    assert "| paper | 2 | 4 |" in md  # the summary row: 2 seeds at the last step
    assert "| logit probe (reference: read off the logits) |" in md
    assert "scale" in json.loads((tmp_path / "quality.json").read_text())["logit_probe"]
    # the seeds are separate runs: different initial weights, so different generators
    from fastinv.train import checkpoint
    from fastinv.train.checkpoint import load_inverter

    g0, g1 = (load_inverter(checkpoint.list_checkpoints(tmp_path / "runs" / d / "inverter")[-1],
                            device="cpu")[0].state_dict() for d in ("recipe", "recipe_seed1"))
    assert any(not torch.equal(g0[k], g1[k]) for k in g0 if g0[k].is_floating_point())
    assert (tmp_path / "quality.png").is_file()


def test_every_ablation_row_is_a_valid_config():
    """Each row's overrides on top of each CPU preset's recipe (as run_config applies them)
    pass the config checks: an option the recipe adds must be turned off with what needs it."""
    from fastinv.train.config import ConfigError, apply_overrides, base_config, validate

    weights = {n: f"{n}.safetensors" for n in (*demo.CLASSIFIERS, "judge")}
    for preset in ("default", "quick", "tiny"):
        p = demo.PRESETS[preset]
        for name, overrides in ABLATIONS.items():
            cfg = base_config(p.inverter.preset)
            c = cfg.classifier
            c.spec, c.weights, c.random_init = "fastinv:small_cnn", weights["standard"], False
            try:
                apply_overrides(cfg, [*p.inverter.overrides, *demo.d_net_overrides(p, weights),
                                      *overrides])
                validate(cfg)
            except ConfigError as e:
                raise AssertionError(f"row {name!r} on the {preset} preset: {e}") from e


def test_quality_benchmark_inverts_the_robust_classifier(tmp_path):
    """``--phi robust``: the runs invert the robust classifier's logits (its weights are the
    run's Φ, the held-out logits are its own) in folders of their own."""
    assert main(["--preset", "tiny", "--work", str(tmp_path), "--steps", "2", "--eval-every", "2",
                 "--configs", "recipe", "--phi", "robust"]) == 0
    from fastinv.train.config import load_config

    run = tmp_path / "runs" / "robust_recipe" / "inverter"
    cfg = load_config(str(run / "config.yaml"), [])
    assert cfg.classifier.weights == str(tmp_path / "classifiers" / "robust.safetensors")
    row = json.loads((tmp_path / "quality.json").read_text())["rows"][0]
    assert "scale" in row["factor_r2_each"] and "scale_within_r" in row


if __name__ == "__main__":
    sys.exit(main())
