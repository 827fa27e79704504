"""Sampling from fine-tuned EPG models: EDM Heun / Euler with interval classifier-free guidance, and consistency
sampling in one or two steps.

Paper: §4 "Evaluation" (32-step Heun ODE sampler, interval CFG with the guidance interval (0.19, 1.61], 50-step Euler
in the ablations, one-step sampling for consistency models), eq. 4, eq. 10, Table 9 (resolution shift s = H/64).

    diffusion (x-prediction)                       consistency (eq. 4)
    ------------------------                       -------------------
    sigma~_i = s * t_i(steps), i = 0..steps-1       x = f(s*80 z, s*80)                        (one step)
    x_T = sigma~_0 z                                x <- x + sqrt(t~_mid^2 - s^2 sigma_min^2) z'
    Heun (EDM Alg. 2, no churn) down to sigma~_-1   x = f(x, t~_mid)                           (--steps 2)
    D = clamp(D_u + w (D_c - D_u)) inside the interval, D_c outside

The grid has no final sigma = 0: the sampler stops at s * sigma_min and returns x there, as the official code does,
so 32 Heun steps cost 31 * 2 = 62 conditional evaluations (+12 unconditional ones with CFG: 74, the paper's "75
NFE" counts EDM's 2N - 1 = 63 with a final step to zero). The CFG interval is stated on the unshifted sigma and
tested on the sigma value of the grid itself: guide iff 0.19 < sigma~ / s <= 1.61.

Per-image randomness: image i draws its x_T (and the noise of a second consistency step) from a generator seeded by
(seed, i), and its random label from one stream over all images, so image i is the same whatever the batch size or
number of processes. Under torchrun, rank r samples images r, r + world, r + 2 world, ...; rank 0 writes the results.

Outputs (OUT): samples.npz in the ADM/DiT format (arr_0: N x H x W x 3 uint8, arr_1: N int64 labels), grid.png
(one row per class, up to 10 classes x 10 images), and with --png one PNG per image in OUT/images/.

Usage:
    python sample.py --ckpt runs/dm/ckpt_last.pt --num-samples 64 --steps 32 --cfg-scale 2.5 --out runs/samples
    python sample.py --ckpt runs/cm/ckpt_last.pt --num-samples 64 --out runs/samples_cm             # one step
    torchrun --nproc_per_node=8 sample.py --ckpt ckpt.pt --num-samples 50000 --labels balanced --cfg-scale 2.5
Guidance scales of the official scripts: 2.5 for EPG-XL/16 at 256^2, 3.2 for EPG-L/32 at 512^2 (scale w in
D_u + w (D_c - D_u), w = 1 is no guidance; the Ho-Salimans scale is w - 1).
"""
import argparse
import contextlib
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import data
import losses
import models
import trainlib

CONFIG = dict(
    num_samples=50_000,        # the paper's FID uses 50k images (ADM evaluation suite)
    batch_size=100,            # per process; the official sampler's mini-batch
    heun_steps=32,             # paper §4: "Heun ODE sampler with 32 sampling steps"
    euler_steps=50,            # paper §4 ablations: "Euler deterministic sampler with 50 sampling steps"
    consistency_steps=1,       # paper §4: one-step sampling for consistency models
    cfg_scale=1.0,             # off; official scripts: 2.5 (EPG-XL/16 @256), 3.2 (EPG-L/32 @512)
    cfg_interval=(0.19, 1.61), # paper §4 (Kynkaanniemi et al. 2024), unshifted sigma, scaled by s as in the official code
    mid_sigma=1.526,           # two-step consistency: ECT's ImageNet-64 value; 64x64 is the base of the shift, so
                               # s * 1.526 has the same signal-to-noise ratio at every resolution
    clamp="data",              # clamp D to the valid normalised range per channel; the official code clamps to
                               # [-1, 1] (--clamp official), which caps colours under the imagenet normalisation
    grid_classes=10, grid_columns=10,
)


# ----------------------------------------------------------------------------------------------------------------
# Noise levels and per-image randomness
# ----------------------------------------------------------------------------------------------------------------
def sampling_sigmas(steps, image_size):
    """Shifted Karras grid sigma~_i = s * t_i (eq. 10, Table 9), descending, float64 (steps,); no final zero."""
    return losses.resolution_shift(image_size) * losses.karras_sigmas(steps)


_TAG_IMAGE, _TAG_LABELS = 7919, 7927      # keep the noise and the label streams apart


def image_seed(seed, index, tag=_TAG_IMAGE):
    """The seed of image `index`'s generator: a hash of (seed, index), independent of batching and processes."""
    return int(np.random.SeedSequence([seed, index, tag]).generate_state(1, dtype=np.uint64)[0] >> 1)


def initial_noise(seed, indices, shape, draws=1):
    """Standard normal noise of the images `indices`: (draws, len(indices), *shape) float32 (CPU).

    Draw 0 becomes x_T (times sigma~_max); further draws are the fresh noise of later consistency steps. Image i's
    draws come from its own generator seeded by (seed, i), so they do not depend on which batch it falls into.
    """
    out = torch.empty(draws, len(indices), *shape)
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(image_seed(seed, int(i)))
        for k in range(draws):
            out[k, j] = torch.randn(shape, generator=g)
    return out


def class_labels(mode, num_samples, num_classes, seed=0):
    """Labels of all images, (num_samples,) int64.

    "random":   uniform over the classes (one stream for all images, so label i is fixed by (seed, i));
    "balanced": label_i = floor(i * C / N): sorted blocks, exactly N / C images per class when C divides N, otherwise
                every class gets floor(N / C) or ceil(N / C) images (the official sampler's padding left some classes
                empty; this never does);
    "3,5,7":    a comma-separated list, repeated cyclically (a single number: every image of that class).
    """
    if mode == "random":
        g = torch.Generator().manual_seed(image_seed(seed, 0, _TAG_LABELS))
        return torch.randint(num_classes, (num_samples,), generator=g)
    if mode == "balanced":
        return torch.arange(num_samples) * num_classes // num_samples
    try:
        values = [int(v) for v in mode.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise trainlib.UserError(f"--labels {mode!r}: use random, balanced or a comma-separated list of class ids")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise trainlib.UserError(f"class label {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return torch.tensor(values, dtype=torch.int64).repeat(math.ceil(num_samples / len(values)))[:num_samples]


# ----------------------------------------------------------------------------------------------------------------
# Denoisers: the network as D(x; sigma~) with interval CFG and clamping
# ----------------------------------------------------------------------------------------------------------------
def clamp_range(mode, normalize="simple"):
    """(lo, hi) per channel, each (3,), for --clamp data|official; None for none."""
    if mode == "none":
        return None
    if mode == "official":
        return torch.full((3,), -1.0), torch.full((3,), 1.0)
    if mode == "data":
        return data.data_range(normalize)
    raise trainlib.UserError(f"unknown --clamp {mode!r}; choose data, official or none")


def clamp_to(x, bounds):
    """Clamp x (B, 3, H, W) per channel to bounds = (lo (3,), hi (3,)); identity for None."""
    if bounds is None:
        return x
    lo, hi = (b.to(x.device, x.dtype).view(1, 3, 1, 1) for b in bounds)
    return torch.maximum(torch.minimum(x, hi), lo)


def guided_denoiser(model, labels, null_label, shift, cfg_scale=1.0, cfg_interval=(0.19, 1.61), clamp=None,
                    counter=None, autocast=contextlib.nullcontext):
    """The diffusion denoiser D(x; sigma~) of the network (x-prediction, Table 9) with interval CFG (formulas of
    Kynkaanniemi et al. 2024 as the official code applies them).

    model: F(x_in, c_noise, y) (an EPG); labels: (B,) int64; null_label: the null class (= num_classes);
    shift: s = H/64; cfg_interval: unshifted (lo, hi]; clamp: per-channel bounds from clamp_range or None;
    counter: optional dict whose "forwards" entry counts network evaluations (images through the network).
    Returns denoiser(x (B,3,H,W), sigma (float, shifted)) -> (B,3,H,W) in x's dtype:
        inside lo < sigma/s <= hi and w != 1:  D_u + w (D_c - D_u), cond and uncond batched in one forward;
        otherwise:                             D_c (only the conditional forward runs).
    The interval test uses the sigma value itself (float64), never a time input recovered from c_noise.
    """
    lo, hi = cfg_interval

    def denoiser(x, sigma):
        sigma = float(sigma)
        guide = cfg_scale != 1.0 and lo < sigma / shift <= hi
        x_in, y_in = x, labels
        if guide:
            x_in = torch.cat([x, x])
            y_in = torch.cat([labels, torch.full_like(labels, null_label)])
        sigma_vec = torch.full((x_in.shape[0],), sigma, dtype=torch.float32, device=x.device)
        with autocast():
            out = losses.denoise(model, x_in.float(), sigma_vec, y_in).to(x.dtype)
        if counter is not None:
            counter["forwards"] = counter.get("forwards", 0) + x_in.shape[0]
        if guide:
            cond, uncond = out.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        return clamp_to(out, clamp)

    return denoiser


def consistency_fn(model, labels, shift, clamp=None, counter=None, autocast=contextlib.nullcontext):
    """The consistency function f(x, sigma~) of eq. 4 with boundary sigma~_min = s * sigma_min, clamped like D.
    Returns f(x (B,3,H,W), sigma (float, shifted)) -> (B,3,H,W) in x's dtype."""
    sigma_min = shift * losses.SIGMA_MIN

    def f(x, sigma):
        sigma_vec = torch.full((x.shape[0],), float(sigma), dtype=torch.float32, device=x.device)
        with autocast():
            out = losses.consistency_function(model, x.float(), sigma_vec, labels, sigma_min).to(x.dtype)
        if counter is not None:
            counter["forwards"] = counter.get("forwards", 0) + x.shape[0]
        return clamp_to(out, clamp)

    return f


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def heun_sample(denoiser, x, sigmas):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 2 with S_churn = 0) over the descending grid
    `sigmas` (float64 (steps,), shifted), WITHOUT a final step to sigma = 0: returns x at sigmas[-1].

    x: x_T = sigmas[0] * z, (B, 3, H, W); the state stays in x's dtype. 2 (steps - 1) denoiser calls:
        d = (x - D(x; s_i)) / s_i;  x' = x + (s_{i+1} - s_i) d;  d' = (x' - D(x'; s_{i+1})) / s_{i+1}
        x <- x + (s_{i+1} - s_i) (d + d') / 2
    """
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoiser(x, s_cur)) / s_cur
        x_euler = x + (s_next - s_cur) * d
        d_next = (x_euler - denoiser(x_euler, s_next)) / s_next
        x = x + (s_next - s_cur) * 0.5 * (d + d_next)
    return x


@torch.no_grad()
def euler_sample(denoiser, x, sigmas):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma over `sigmas`, ending at
    sigmas[-1] (steps - 1 denoiser calls: 49 for the paper's 50-step ablation sampler). Shapes as heun_sample."""
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s_cur) * (x - denoiser(x, s_cur)) / s_cur
    return x


@torch.no_grad()
def consistency_sample(f, z, shift, mid_sigmas=()):
    """Consistency sampling (Song et al. 2023, Alg. 1) with shifted noise levels.

    f: consistency function f(x, sigma~); z: (1 + len(mid_sigmas), B, 3, H, W) standard normal draws;
    mid_sigmas: unshifted intermediate levels (empty: one step). One step: x = f(s*80 z_0, s*80); then for each
    t_mid: x <- x + sqrt((s t_mid)^2 - (s sigma_min)^2) z_k, x = f(x, s t_mid).
    """
    sigma_max, sigma_min = shift * losses.SIGMA_MAX, shift * losses.SIGMA_MIN
    x = f(sigma_max * z[0], sigma_max)
    for k, t_mid in enumerate(mid_sigmas, start=1):
        t = shift * t_mid
        x = x + math.sqrt(t * t - sigma_min * sigma_min) * z[k]
        x = f(x, t)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Model loading and output
# ----------------------------------------------------------------------------------------------------------------
def load_official_generator(path, weights="ema"):
    """An EPG released by the authors (a folder of state dicts or one .pth): (model, config, stage, official
    sampling defaults). The config carries the official normalisation so the released FIDs can be reproduced."""
    import official
    try:
        kind, cfg, state = official.load_official(path, prefer=weights)
        defaults = official.official_sampling(cfg)
        model = official.build_model(cfg)
        model.load_state_dict(state)
    except official.OfficialCheckpointError as e:
        raise trainlib.UserError(f"'{path}': {e}") from None
    cfg = {**cfg, "normalize": defaults["normalize"]}
    return model.eval().requires_grad_(False), cfg, defaults["stage"], defaults


def load_generator(path, weights="ema"):
    """(EPG model in eval mode with the chosen weights, checkpoint config, stage, sampling defaults) from a
    fine-tuning checkpoint of this project or an official one (see load_official_generator)."""
    import official
    if os.path.isdir(path) or official.is_official_checkpoint(path):
        return load_official_generator(path, weights)
    state = trainlib.load_checkpoint(path)
    stage = state["stage"]
    if stage == "pretrain":
        raise trainlib.UserError(f"'{path}' is a pre-training (RCM) checkpoint, which cannot generate images: "
                                 f"fine-tune it first with train_diffusion.py or train_consistency.py --init {path}")
    if stage not in ("diffusion", "consistency"):
        raise trainlib.UserError(f"'{path}' has unknown stage {stage!r}; pass a diffusion or consistency checkpoint")
    cfg = state["config"]
    missing = [k for k in ("model", "image_size", "num_classes") if k not in cfg]
    if missing:
        raise trainlib.UserError(f"'{path}' lacks config entries {missing}; it was not written by this project")
    key = "ema" if weights == "ema" else "model"
    if key not in state:
        raise trainlib.UserError(f"'{path}' holds no {key!r} weights; use --weights online")
    model = models.build_epg(cfg["model"], cfg["image_size"], cfg["num_classes"])
    try:
        model.load_state_dict(state[key])
    except RuntimeError as e:
        raise trainlib.UserError(f"'{path}': the {key} weights do not match EPG-{cfg['model']} "
                                 f"({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False), cfg, stage, {}


def save_grid(images, path, columns):
    """Tile uint8 images (N, H, W, 3) row by row into one PNG with `columns` images per row (2 px white gaps)."""
    from PIL import Image
    n, h, w, _ = images.shape
    rows, pad = math.ceil(n / columns), 2
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[k]
    Image.fromarray(canvas).save(path)


def class_grid(images, labels, path, max_classes=10, per_class=10):
    """grid.png: one row per class (the first `max_classes` classes present), up to `per_class` images each."""
    order = []
    for label in sorted(set(labels.tolist()))[:max_classes]:
        picked = np.flatnonzero(labels == label)[:per_class].tolist()
        order += picked + [-1] * (per_class - len(picked))
    blank = np.full(images.shape[1:], 255, dtype=np.uint8)
    tiles = np.stack([images[k] if k >= 0 else blank for k in order])
    save_grid(tiles, path, per_class)


def generate(model, cfg, stage, indices, labels, args, device, autocast, counter):
    """Samples of the images `indices` (with `labels`, (B,)): model-space tensor (B, 3, H, W) float32."""
    size = cfg["image_size"]
    shift = losses.resolution_shift(size)
    bounds = clamp_range(args.clamp, cfg.get("normalize", "simple"))
    labels = labels.to(device)
    if args.sampler == "consistency":
        mids = [args.mid_sigma] if args.steps == 2 else []
        z = initial_noise(args.seed, indices, (3, size, size), draws=1 + len(mids)).to(device)
        f = consistency_fn(model, labels, shift, bounds, counter, autocast)
        return consistency_sample(f, z, shift, mids).float()
    z = initial_noise(args.seed, indices, (3, size, size))[0].to(device)
    sigmas = sampling_sigmas(args.steps, size)
    denoiser = guided_denoiser(model, labels, cfg["num_classes"], shift, args.cfg_scale, tuple(args.cfg_interval),
                               bounds, counter, autocast)
    sampler = heun_sample if args.sampler == "heun" else euler_sample
    return sampler(denoiser, float(sigmas[0]) * z, sigmas).float()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from an EPG diffusion or consistency checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of train_diffusion.py or train_consistency.py")
    p.add_argument("--out", default="runs/samples", help="output directory (samples.npz, grid.png, images/)")
    p.add_argument("--num-samples", type=int, default=CONFIG["num_samples"], help="number of images")
    p.add_argument("--batch-size", type=int, default=CONFIG["batch_size"], help="images per forward, per process")
    p.add_argument("--sampler", choices=("heun", "euler", "consistency"), default=None,
                   help="default: heun for diffusion checkpoints, consistency for consistency checkpoints")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (grid points); default {CONFIG['heun_steps']} Heun, {CONFIG['euler_steps']} "
                        f"Euler, {CONFIG['consistency_steps']} consistency (1 or 2)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance scale w of D_u + w (D_c - D_u); 1 = off (2.5: EPG-XL/16 @256, 3.2: EPG-L/32 @512). "
                        "Default 1, or the official script's scale for the authors' released checkpoints")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=list(CONFIG["cfg_interval"]), metavar=("LO", "HI"),
                   help="guide only where LO < sigma/s <= HI (unshifted sigma)")
    p.add_argument("--mid-sigma", type=float, default=CONFIG["mid_sigma"],
                   help="unshifted intermediate noise level of two-step consistency sampling")
    p.add_argument("--labels", default="random",
                   help="random (uniform), balanced (equal counts, sorted), or a comma-separated list of class ids")
    p.add_argument("--class-label", type=int, default=None, help="every image of this class (same as --labels K)")
    p.add_argument("--weights", choices=("ema", "online"), default="ema", help="EMA or online weights")
    p.add_argument("--clamp", choices=("data", "official", "none"), default=None,
                   help="clamp the denoiser output: data = valid normalised range per channel (default), official = "
                        "[-1, 1] (the default for the authors' released checkpoints, to reproduce their FIDs)")
    p.add_argument("--seed", type=int, default=0, help="image i uses a generator seeded by (seed, i)")
    p.add_argument("--png", action="store_true", help="also write one PNG per image to OUT/images/")
    p.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast (default: fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.num_samples <= 0:
        raise trainlib.UserError(f"--num-samples must be positive, got {args.num_samples}")
    if args.batch_size <= 0:
        raise trainlib.UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise trainlib.UserError(f"--seed must be >= 0, got {args.seed}")
    if args.class_label is not None:
        args.labels = str(args.class_label)
    return args


def resolve_sampler(args, stage):
    """Fill in the sampler and step count from the checkpoint's stage and check they fit together."""
    if args.sampler is None:
        args.sampler = "consistency" if stage == "consistency" else "heun"
    if args.steps is None:
        args.steps = {"heun": CONFIG["heun_steps"], "euler": CONFIG["euler_steps"],
                      "consistency": CONFIG["consistency_steps"]}[args.sampler]
    if args.sampler == "consistency":
        if args.steps not in (1, 2):
            raise trainlib.UserError(f"consistency sampling takes --steps 1 or 2, got {args.steps}")
        if args.cfg_scale != 1.0:
            raise trainlib.UserError("classifier-free guidance is defined for the diffusion samplers only; "
                                     "drop --cfg-scale or use --sampler heun")
        if args.steps == 2 and args.mid_sigma <= losses.SIGMA_MIN:
            raise trainlib.UserError(f"--mid-sigma must exceed sigma_min = {losses.SIGMA_MIN}, got {args.mid_sigma}")
    elif args.steps < 2:
        raise trainlib.UserError(f"the {args.sampler} sampler needs --steps >= 2 (grid points), got {args.steps}")
    if (args.sampler == "consistency") != (stage == "consistency"):
        raise trainlib.UserError(f"--sampler {args.sampler} does not fit a {stage} checkpoint: use "
                                 f"{'--sampler consistency' if stage == 'consistency' else '--sampler heun or euler'}")


def main():
    args = parse_args()
    env = trainlib.init_distributed(args.device)
    model, cfg, stage, official_defaults = load_generator(args.ckpt, args.weights)
    # official checkpoints: the official clamp and guidance scale unless given on the command line
    if args.clamp is None:
        args.clamp = official_defaults.get("clamp", CONFIG["clamp"])
    if args.cfg_scale is None:
        args.cfg_scale = official_defaults.get("cfg_scale") or CONFIG["cfg_scale"]
    if official_defaults and env.is_main:
        print(f"official checkpoint: normalize {cfg['normalize']}, clamp {args.clamp}, CFG scale {args.cfg_scale}, "
              f"{official_defaults['stage']} model (override with --clamp/--cfg-scale/--sampler)")
    resolve_sampler(args, stage)
    model.to(env.device)
    num_classes = cfg["num_classes"]
    labels = class_labels(args.labels, args.num_samples, num_classes, args.seed)
    if env.is_main:
        trainlib.check_output_dir(args.out)
    if env.enabled:
        dist.barrier()

    def autocast():
        if args.bf16:
            return torch.autocast(env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    mine = torch.arange(env.rank, args.num_samples, env.world)              # rank r: images r, r + world, ...
    mode = cfg.get("normalize", "simple")
    images = np.zeros((len(mine), cfg["image_size"], cfg["image_size"], 3), dtype=np.uint8)
    counter = {"forwards": 0}
    bar = trainlib.progress(len(mine), 0, env.is_main and not args.no_progress, "sampling")
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start:start + args.batch_size]
        x = generate(model, cfg, stage, idx, labels[idx], args, env.device, autocast, counter)
        images[start:start + len(idx)] = data.to_uint8_hwc(x, mode)
        bar.update(len(idx))
    bar.close()
    nfe = counter["forwards"] / max(len(mine), 1)

    if env.enabled:                                        # each rank leaves its shard on disk, rank 0 merges
        np.save(os.path.join(args.out, f".shard-{env.rank}.npy"), images)
        dist.barrier()
    if env.is_main:
        everything = np.zeros((args.num_samples, *images.shape[1:]), dtype=np.uint8)
        for r in range(env.world):
            shard_path = os.path.join(args.out, f".shard-{r}.npy")
            everything[r::env.world] = images if r == 0 else np.load(shard_path)
            if env.enabled:
                os.remove(shard_path)
        arr_1 = labels.numpy().astype(np.int64)
        np.savez(os.path.join(args.out, "samples.npz"), arr_0=everything, arr_1=arr_1)
        class_grid(everything, arr_1, os.path.join(args.out, "grid.png"), CONFIG["grid_classes"],
                   CONFIG["grid_columns"])
        if args.png:
            from PIL import Image
            os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
            for i, image in enumerate(everything):
                Image.fromarray(image).save(os.path.join(args.out, "images", f"{i:06d}.png"))
        guidance = (f", CFG {args.cfg_scale} on ({args.cfg_interval[0]}, {args.cfg_interval[1]}]"
                    if args.cfg_scale != 1.0 and args.sampler != "consistency" else "")
        print(f"{args.num_samples} images ({args.sampler}, {args.steps} steps{guidance}, {args.weights} weights): "
              f"{nfe:g} network evaluations per image; wrote {os.path.join(args.out, 'samples.npz')} and grid.png")
    if env.enabled:
        dist.barrier()


if __name__ == "__main__":
    trainlib.cli_main(main)
