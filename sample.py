"""Sampling from fine-tuned EPG models (paper §4 "Evaluation"): EDM Heun / Euler with interval classifier-free
guidance, and one- or two-step consistency sampling (the samplers and their equations: losses.py).

The grid has no final sigma = 0 (as the official code): 32 Heun steps cost 62 conditional evaluations (+12
unconditional ones with CFG). Guidance acts where 0.19 < sigma~ / s <= 1.61 (paper §4); a checkpoint may record other
defaults (the T preset: CFG 4.0 where 1.61 < sigma~ / s, as at 32^2 the paper's interval guides only sigma~ <= 0.8).

Image i draws its noise from a generator seeded by (seed, i) and its label from one stream over all images, whatever
the batch size or number of processes. Chunks of --batch-size images go to OUT/chunks/ atomically as they finish;
SIGTERM or Ctrl-C stops after the current chunk, and the same command draws only the missing (or unreadable) ones.
The result: OUT/samples.npz (ADM format: arr_0 N x H x W x 3 uint8, arr_1 N int64 labels), grid.png (one row per
class) and, with --png, one PNG per image.

    python sample.py --ckpt runs/dm/ckpt_last.pt --num-samples 64 --cfg-scale 2.5 --out runs/samples
    python sample.py --ckpt runs/cm/ckpt_last.pt --num-samples 64 --out runs/samples_cm            # one step
    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --num-samples 50000 --labels balanced --cfg-scale 2.5
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

import data
import evaluate
import losses
import models
import rundir
import trainlib

CONFIG = dict(
    num_samples=50_000,        # the paper's FID uses 50k images (ADM evaluation suite)
    batch_size=100,            # images per chunk and per forward; the official sampler's mini-batch
    steps={"heun": 32, "euler": 50, "consistency": 1},   # paper §4: Heun-32, Euler-50 (ablations), one step
    cfg_scale=1.0,             # off; official scripts: 2.5 (EPG-XL/16 @256), 3.2 (EPG-L/32 @512)
    cfg_interval=[0.19, 1.61], # paper §4 (Kynkaanniemi et al. 2024), unshifted sigma
    mid_sigma=1.526,           # two-step consistency: ECT's ImageNet-64 value; 64^2 is the base of the shift
    clamp="data",              # D clamped to the valid normalised range per channel; official code: [-1, 1]
)
_TAG_LABELS = 7927             # the label stream, apart from the image noise (evaluate.initial_noise)


def class_labels(mode, num_samples, num_classes, seed=0, class_counts=None):
    """Labels (num_samples,) of all images:
    "random":   by the training set's class counts where known (as the official sampler), else uniformly;
    "balanced": label_i = floor(i * C / N): every class gets floor(N / C) or ceil(N / C) images;
    "3,5,7":    a comma-separated list, repeated cyclically.
    A class-free model (num_classes 0, e.g. the released one-step EPG-L/16) takes its null row, label 0."""
    if num_classes == 0:
        if mode not in ("random", "balanced"):
            raise rundir.UserError(f"--labels {mode}: this checkpoint is class-free (unconditional); drop --labels")
        return torch.zeros(num_samples, dtype=torch.int64)
    if mode == "random":
        g = torch.Generator().manual_seed(trainlib.mix_seed(seed, 0, _TAG_LABELS))
        if class_counts is None:
            return torch.randint(num_classes, (num_samples,), generator=g)
        return torch.multinomial(torch.as_tensor(class_counts, dtype=torch.float64), num_samples, True, generator=g)
    if mode == "balanced":
        return torch.arange(num_samples) * num_classes // num_samples
    try:
        values = [int(v) for v in mode.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise rundir.UserError(f"--labels {mode!r}: use random, balanced or a comma-separated list of class ids")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise rundir.UserError(f"class label {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return torch.tensor(values, dtype=torch.int64).repeat(math.ceil(num_samples / len(values)))[:num_samples]


def chunk_intact(file, shape):
    """Whether a chunk file holds uint8 images of `shape` (a crash can leave it empty or cut short)."""
    try:
        array = np.load(file, mmap_mode="r")
    except Exception:  # noqa: BLE001 - whatever the reading error, the chunk is drawn again
        return False
    return array.shape == shape and array.dtype == np.uint8


def clamp_range(mode, normalize="simple"):
    return {"none": None, "official": (torch.full((3,), -1.0), torch.full((3,), 1.0)),
            "data": data.data_range(normalize)}[mode]


def load_generator(path, weights="ema"):
    """(EPG in eval mode, checkpoint config, stage) of a fine-tuning checkpoint. Only the chosen weights are read
    (memory-mapped, used in place): a process needs about their size in host memory."""
    state = rundir.load_checkpoint(path, mmap=True)
    stage, cfg = state["stage"], state["config"]
    if stage == "pretrain":
        raise rundir.UserError(f"'{path}' is a pre-training (RCM) checkpoint, which cannot generate images: "
                                 f"fine-tune it first with train_diffusion.py or train_consistency.py --init {path}")
    key = "ema" if weights == "ema" else "model"
    if key not in state:
        raise rundir.UserError(f"'{path}' holds no {key!r} weights; use --weights online")
    with torch.device("meta"):                     # no memory: the weights are the checkpoint's mapped tensors
        model = models.build_epg(cfg["model"], cfg["image_size"], cfg["num_classes"])
    try:
        model.load_state_dict(state[key], assign=True)
    except RuntimeError as e:
        raise rundir.UserError(f"'{path}': the {key} weights do not match EPG-{cfg['model']} "
                                 f"({str(e).splitlines()[0]})") from None
    if not all(p.isfinite().all() for p in model.parameters()):
        raise rundir.UserError(f"'{path}': the {key} weights contain NaN or inf; use an earlier checkpoint")
    return model.eval().requires_grad_(False), cfg, stage


MAX_STEPS = 100_000            # sampling steps beyond this are a typo, not a sampler


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from an EPG diffusion or consistency checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of train_diffusion.py or train_consistency.py")
    p.add_argument("--out", default="runs/samples", help="output directory (samples.npz, grid.png, images/)")
    p.add_argument("--num-samples", type=int, default=CONFIG["num_samples"], help="number of images")
    p.add_argument("--batch-size", type=int, default=CONFIG["batch_size"], help="images per chunk and per forward")
    p.add_argument("--sampler", choices=("heun", "euler", "consistency"), default=None,
                   help="none: heun for diffusion checkpoints, consistency for consistency checkpoints")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (grid points); none: {CONFIG['steps']} by sampler")
    recorded = "none: the checkpoint's recorded sampling default, else"
    p.add_argument("--cfg-scale", type=float, default=None,
                   help=f"guidance scale w of D_u + w (D_c - D_u); 1 = off ({recorded} {CONFIG['cfg_scale']})")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"guide only where LO < sigma/s <= HI, unshifted ({recorded} {CONFIG['cfg_interval']})")
    p.add_argument("--mid-sigma", type=float, default=CONFIG["mid_sigma"],
                   help="unshifted intermediate level of two-step consistency sampling")
    p.add_argument("--labels", default="random",
                   help="random (by the training set's class counts), balanced, or a comma-separated list of ids")
    p.add_argument("--weights", choices=("ema", "online"), default="ema", help="EMA or online weights")
    p.add_argument("--clamp", choices=("data", "official", "none"), default=None,
                   help=f"clamp D: data = the normalised range, official = [-1, 1] ({recorded} {CONFIG['clamp']})")
    p.add_argument("--seed", type=int, default=0, help="image i uses a generator seeded by (seed, i)")
    p.add_argument("--png", action="store_true", help="also write one PNG per image to OUT/images/")
    p.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast (default: fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (none: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag in ("num_samples", "batch_size", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise rundir.UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.seed < 0:
        raise rundir.UserError(f"--seed must be >= 0, got {args.seed}")
    for flag in ("cfg_scale", "mid_sigma"):
        if getattr(args, flag) is not None and not math.isfinite(getattr(args, flag)):
            raise rundir.UserError(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise rundir.UserError(f"--steps must be at most {MAX_STEPS}, got {args.steps}")
    if args.seed >= 2 ** 63:
        raise rundir.UserError(f"--seed must be below 2^63, got {args.seed}")
    if args.cfg_interval is not None and not 0 <= args.cfg_interval[0] < args.cfg_interval[1]:
        raise rundir.UserError(f"--cfg-interval LO HI needs 0 <= LO < HI, got {args.cfg_interval[0]} "
                               f"{args.cfg_interval[1]}")
    if not losses.SIGMA_MIN < args.mid_sigma < losses.SIGMA_MAX:
        raise rundir.UserError(f"--mid-sigma must lie in the sampling range ({losses.SIGMA_MIN}, {losses.SIGMA_MAX}), "
                               f"got {args.mid_sigma}")
    return args


def resolve_sampler(args, stage, recorded):
    """Sampler, steps, clamp and guidance from the flags, else the checkpoint's recorded sampling defaults (a converted
    official checkpoint: the official scripts'), else CONFIG; checked against the checkpoint."""
    for key, value in recorded.items():
        if getattr(args, key, 0) is None:
            setattr(args, key, value)
    args.sampler = args.sampler or ("consistency" if stage == "consistency" else "heun")
    args.steps = args.steps or CONFIG["steps"][args.sampler]
    for key in ("clamp", "cfg_scale", "cfg_interval"):
        if getattr(args, key) is None:
            setattr(args, key, CONFIG[key])
    lo, hi = args.cfg_interval
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise rundir.UserError(f"--cfg-interval LO HI needs LO < HI (finite), got {lo} {hi}")
    if (args.sampler == "consistency") != (stage == "consistency"):
        raise rundir.UserError(f"--sampler {args.sampler} does not fit a {stage} checkpoint: use "
                                 f"{'--sampler consistency' if stage == 'consistency' else '--sampler heun or euler'}")
    if args.sampler == "consistency":
        if args.steps not in (1, 2):
            raise rundir.UserError(f"consistency sampling takes --steps 1 or 2, got {args.steps}")
        if args.cfg_scale != 1.0:
            raise rundir.UserError("classifier-free guidance is defined for the diffusion samplers only; "
                                     "drop --cfg-scale or use --sampler heun")
        if args.steps == 2 and args.mid_sigma <= losses.SIGMA_MIN:
            raise rundir.UserError(f"--mid-sigma must exceed sigma_min = {losses.SIGMA_MIN}, got {args.mid_sigma}")
    elif args.steps < 2:
        raise rundir.UserError(f"the {args.sampler} sampler needs --steps >= 2 (grid points), got {args.steps}")


def main():
    args = parse_args()
    env = trainlib.init_distributed(args.device)
    model, cfg, stage = load_generator(args.ckpt, args.weights)
    resolve_sampler(args, stage, cfg.get("sampling", {}))
    args.bounds = clamp_range(args.clamp, cfg.get("normalize", "simple"))
    model.to(env.device)
    labels = class_labels(args.labels, args.num_samples, cfg["num_classes"], args.seed, cfg.get("class_counts"))
    chunks, size = os.path.join(args.out, "chunks"), cfg["image_size"]
    num_chunks = math.ceil(args.num_samples / args.batch_size)
    path = lambda c: os.path.join(chunks, f"{c:06d}.npy")                                 # noqa: E731
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "png", "device", "no_progress", "bounds")}
    settings = json.loads(json.dumps({**settings, "ckpt_id": rundir.checkpoint_id(args.ckpt)}))
    final, final_settings = os.path.join(args.out, "samples.npz"), os.path.join(args.out, "settings.json")
    if os.path.isfile(final) and os.path.isfile(final_settings):          # every rank: the same files
        recorded = rundir.read_json(final_settings, "the settings record")
        if recorded != settings:
            diffs = [("the --ckpt file changed" if k == "ckpt_id" else f"--{k.replace('_', '-')} {recorded.get(k)} "
                      f"(then) vs {settings.get(k)} (now)") for k in {**recorded, **settings}
                     if recorded.get(k) != settings.get(k)]
            raise rundir.UserError(f"{final} was drawn with other settings ({'; '.join(sorted(diffs))}); use another "
                                   f"--out, or delete {final} to draw it again")
        env.log(f"already complete: {final} holds the {args.num_samples} images of these settings; nothing to do")
        return
    if env.main:
        rundir.prepare_output(args.out)
        os.makedirs(chunks, exist_ok=True)
        recorded = os.path.join(chunks, "settings.json")
        if os.path.isfile(recorded):
            if rundir.read_json(recorded, "the chunks' settings record") != settings:
                raise rundir.UserError(f"{chunks} holds chunks of a sampling run with other settings; rerun "
                                       f"that command to finish it, or use another --out")
        elif os.path.isfile(final):
            print(f"note: {final} has no settings record; drawing it again", file=sys.stderr)
        rundir.write_json(recorded, settings)
        for c in range(num_chunks):              # a chunk that a crash cut short (no fsync) is drawn again
            rows = min(args.batch_size, args.num_samples - c * args.batch_size)
            if os.path.exists(path(c)) and not chunk_intact(path(c), (rows, size, size, 3)):
                print(f"note: {path(c)} is unreadable or of the wrong shape; drawing it again", file=sys.stderr)
                os.remove(path(c))
    if env.distributed:
        dist.barrier()

    def autocast():
        return torch.autocast(env.device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    # chunk c = images [c B, (c + 1) B); the ranks share the missing chunks round-robin, in rounds after each of
    # which SIGTERM/SIGINT stops them all (the chunks written so far stay)
    mode, counter, drawn = cfg.get("normalize", "simple"), {"forwards": 0}, 0
    missing = [c for c in range(num_chunks) if not os.path.exists(path(c))]
    todo = missing[env.rank::env.world]
    bar = trainlib.progress(num_chunks, num_chunks - len(missing), env.main and not args.no_progress, "sampling")
    for c in todo + [None] * (math.ceil(len(missing) / env.world) - len(todo)):
        if c is not None:
            idx = torch.arange(c * args.batch_size, min((c + 1) * args.batch_size, args.num_samples))
            x = evaluate.generate(model, cfg, idx, labels[idx], args, env.device, autocast, counter)
            drawn += len(idx)
            if not torch.isfinite(x).all():
                raise rundir.UserError(f"images {idx[0].item()}..{idx[-1].item()} came out NaN/inf: a broken model "
                                         f"or sampling settings (try --clamp data, fp32, a smaller --cfg-scale)")
            rundir.write_atomically(path(c), lambda f: np.save(f, data.to_uint8_hwc(x, mode)))
            bar.update(env.world)
        stop = rundir.preempted(env)
        if stop:
            done = sum(os.path.exists(path(k)) for k in range(num_chunks))
            raise rundir.Preempted(stop, f"stopped with {done} of {num_chunks} chunks in {chunks}; rerun the same "
                                           f"command to draw the others")
    bar.close()
    if env.distributed:
        dist.barrier()
    if env.main:
        images = np.concatenate([np.load(path(c)) for c in range(num_chunks)])
        arr_1 = labels.numpy().astype(np.int64)
        rundir.write_atomically(os.path.join(args.out, "samples.npz"),
                                  lambda f: np.savez(f, arr_0=images, arr_1=arr_1))
        data.class_grid(images, arr_1, os.path.join(args.out, "grid.png"))
        if args.png:
            from PIL import Image
            os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
            for i, image in enumerate(images):                  # atomic: no empty PNG under its name on a full disk
                rundir.write_atomically(os.path.join(args.out, "images", f"{i:06d}.png"),
                                        lambda f: Image.fromarray(image).save(f, format="PNG"))
        rundir.write_json(final_settings, settings)             # beside samples.npz: a rerun is "already complete"
        shutil.rmtree(chunks)
        guidance = f", CFG {args.cfg_scale} on ({args.cfg_interval[0]}, {args.cfg_interval[1]}]" \
            if args.cfg_scale != 1.0 else ""
        nfe = f"{counter['forwards'] / drawn:g} network evaluations per image; " if drawn else ""
        print(f"{args.num_samples} images ({args.sampler}, {args.steps} steps{guidance}, {args.weights} weights; "
              f"{len(missing)} of {num_chunks} chunks drawn by this run): {nfe}wrote "
              f"{os.path.join(args.out, 'samples.npz')} and grid.png")
    if env.distributed:
        dist.barrier()


if __name__ == "__main__":
    rundir.cli_main(main)
