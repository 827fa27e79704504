"""Diffusion fine-tuning of EPG (paper §3.3 "Diffusion model", eq. 1, Tables 9 and 11; the main results, Tables 1-3).

The pre-trained RCM encoder (projector discarded) is joined with a fresh decoder and the whole EPG is trained end to end
as an x-prediction denoiser:

    t_n ~ lognormal(-1.2, 1.6) snapped to the N = 1280 Karras grid        (Table 9, dagger; unshifted)
    x_t = x + s t_n eps,  s = image_size / 64                              (Table 9, resolution shift)
    D = F(c_in(s t_n) x_t, c(s t_n), y),  y -> null class w.p. 0.1        (x-prediction; CFG label dropout)
    L = E[ (1 / (t_n - t_{n-1})) * mean_pixels (D - x)^2 ]                 (eq. 1 with Table 9's weighting)

AdamW (0.9, 0.999), lr 1e-4, weight decay 0.01 (none on pos_embed and cls_token), grad-norm clip 0.5, EMA 0.9999
every step, batch 1024, 1M steps (Table 11). The checkpoint holds the online and EMA weights; sample.py uses the EMA.

Examples:
    python train_diffusion.py --model T --init runs/pt/ckpt_last.pt --out runs/dm            # CPU, ~10-20 min
    torchrun --nproc_per_node=8 train_diffusion.py --model XL --data /data/imagenet256 \\
        --init runs/pt_b/ckpt_last.pt --out runs/dm_xl                                        # EPG-XL/16, Table 1
    ... --lr-schedule warmup-cosine --normalize imagenet                                      # the official code's run
Rerunning the same command after an interruption resumes from OUT/ckpt_last.pt.
"""
import contextlib
import copy
import json
import os
import sys

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import sample
import trainlib

CONFIG = dict(
    model="XL",                 # EPG-XL/16: the official ImageNet-256 script (Table 1)
    batch_size=1024,            # Table 11 (global)
    steps=1_000_000,            # Table 11 / §4: 1M steps (800 epochs); 2M for EPG-G
    lr=1e-4,                    # Table 11 (no schedule stated: constant)
    lr_schedule="constant",     # official code: warm-up then cosine to 0 (--lr-schedule warmup-cosine)
    warmup=10_000,              # official code's linear warm-up (only with warmup-cosine)
    betas=(0.9, 0.999),         # Table 11
    weight_decay=0.01,          # Table 11; no decay on pos_embed and cls_token (official parameter groups)
    grad_clip=0.5,              # Table 11; the official code clips only after the warm-up
    ema=0.9999,                 # Table 11; updated every step from step 0 (official)
    label_dropout=0.1,          # not stated in the paper; the official code's rate (null class = num_classes)
    p_mean=-1.2, p_std=1.6,     # Table 9: lognormal(-1.2, 1.6) noise proposal
    num_scales=1280,            # Table 9: the proposal is snapped to the N = 1280 grid
    normalize="simple",         # x in [-1, 1]; the official code: (x - mean_IN) / (2 std_IN) (--normalize imagenet)
    out="runs/dm",
    ckpt_every=5000,
    keep_every=100_000,
    log_every=100,
    sample_every=5000,          # the official code writes a sample grid every 5k steps
    sample_steps=16,            # Heun steps of the in-training grid and the final embedded-data-set evaluation
    eval_samples=1000,          # images for fid.embedded_metrics at the end (embedded data set only)
)
# --model T on a CPU: the paper's batch and step count would take days. A short, larger-lr run with a faster EMA
# (about 0.5-1 s per step on 2 busy cores). Rerunning with a larger --steps continues the run (constant lr).
# Its noise proposal is centred higher, lognormal(0.4, 1.6): at 32^2 the shift s = 32/64 = 0.5 halves every noise
# level, and with Table 9's lognormal(-1.2, 1.6) only ~1 % of a few thousand steps' samples land above sigma~ = 5,
# where the sampler lays out the image; the tiny model then never learns the layout (README, tiny preset).
TINY = dict(batch_size=32, steps=1200, lr=1e-3, ema=0.995, ckpt_every=200, log_every=25, sample_every=400,
            eval_samples=200, p_mean=0.4)
RESUME_KEYS = ("model", "image_size", "batch_size", "data", "seed", "normalize", "lr", "lr_schedule", "warmup",
               "weight_decay", "grad_clip", "ema", "label_dropout", "p_mean", "p_std", "num_scales", "num_classes")


def parse_args(argv=None):
    defaults = {**CONFIG, "batch_size": None, "steps": None, "lr": None, "ckpt_every": None, "log_every": None}
    p = trainlib.common_parser("Diffusion fine-tuning of EPG (paper §3.3, eq. 1, Tables 9 and 11).", defaults)
    p.add_argument("--init", default=None, help="RCM checkpoint of pretrain.py whose encoder initialises EPG")
    p.add_argument("--from-scratch", action="store_true", help="random encoder (ablation without pre-training)")
    p.add_argument("--lr-schedule", choices=("constant", "warmup-cosine"), default=CONFIG["lr_schedule"],
                   help="constant (paper) or the official code's linear warm-up + cosine decay to 0")
    p.add_argument("--warmup", type=int, default=CONFIG["warmup"], help="warm-up steps of warmup-cosine")
    p.add_argument("--grad-clip", type=float, default=CONFIG["grad_clip"], help="grad-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=None, help=f"EMA decay (default {CONFIG['ema']}; {TINY['ema']} for T)")
    p.add_argument("--p-mean", type=float, default=None,
                   help=f"mean of ln t of the noise proposal (default {CONFIG['p_mean']}, Table 9; {TINY['p_mean']} for T)")
    p.add_argument("--p-std", type=float, default=CONFIG["p_std"], help="std of ln t of the noise proposal (Table 9)")
    p.add_argument("--label-dropout", type=float, default=CONFIG["label_dropout"],
                   help="probability of replacing the label by the null class (for classifier-free guidance)")
    p.add_argument("--normalize", choices=data.NORMALIZATIONS, default=None,
                   help="pixel normalisation: simple = [-1, 1], imagenet = the official (x - mean) / (2 std); "
                        f"default: that of the --init checkpoint, else {CONFIG['normalize']}")
    p.add_argument("--sample-every", type=int, default=None,
                   help=f"write OUT/samples_<step>.png (EMA, Heun) every this many steps (0: only at the end; "
                        f"default {CONFIG['sample_every']}, {TINY['sample_every']} for T)")
    p.add_argument("--sample-steps", type=trainlib.positive_int, default=CONFIG["sample_steps"],
                   help="Heun steps of the sample grids and the final evaluation")
    p.add_argument("--eval-samples", type=int, default=None,
                   help=f"images for the final embedded-data-set metrics (0: skip; default {CONFIG['eval_samples']}, "
                        f"{TINY['eval_samples']} for T)")
    args = p.parse_args(argv)
    tiny = args.model == "T"
    for key in ("batch_size", "steps", "lr", "ema", "ckpt_every", "log_every", "sample_every", "eval_samples",
                "p_mean"):
        if getattr(args, key) is None:
            setattr(args, key, TINY[key] if tiny and key in TINY else CONFIG[key])
    if args.weight_decay is None:
        args.weight_decay = CONFIG["weight_decay"]
    if not 0.0 <= args.label_dropout < 1.0:
        raise trainlib.UserError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if not 0.0 <= args.ema < 1.0:
        raise trainlib.UserError(f"--ema must be in [0, 1), got {args.ema}")
    if args.model not in models.MODEL_CONFIGS:
        raise trainlib.UserError(f"unknown --model {args.model}; choose one of {', '.join(models.MODEL_CONFIGS)}")
    trainlib.resolve_image_size(args)
    try:
        models.patch_size_for(args.model, args.image_size)
    except ValueError as e:
        raise trainlib.UserError(str(e)) from None
    return args


def step_randomness(args, step, device):
    """The random draws of one step for the whole GLOBAL batch (B = --batch-size), from streams seeded by
    (seed, step) only, so every rank and a resumed run see the same values.

    Returns sigma (B,) unshifted t_n and weight (B,) = 1/(t_n - t_{n-1}) (Table 9, from losses.diffusion_noise),
    drop (B,) bool (label -> null class, w.p. --label-dropout), eps (B, 3, H, W) standard normal on `device`.
    """
    g = trainlib.step_generator(args.seed, step, "cpu", stream=0)
    sigma, weight = losses.diffusion_noise(args.batch_size, g, args.p_mean, args.p_std, CONFIG["num_scales"])
    drop = torch.rand(args.batch_size, generator=g) < args.label_dropout
    eps = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device,
                      generator=trainlib.step_generator(args.seed, step, device, stream=1))
    return sigma, weight, drop, eps


def denoising_loss(net, x0, y, sigma, weight, eps, shift, device):
    """Eq. 1 with Table 9's settings, averaged over the batch (a scalar).

    x0: (B, 3, H, W) clean images; y: (B,) labels (null class already applied); sigma, weight: (B,) unshifted noise
    level and its weight; eps: (B, 3, H, W) noise; shift: s = image_size / 64.
        x_t = x0 + s sigma eps,  D = F(c_in(s sigma) x_t, c(s sigma), y),  loss = mean_b weight_b mean_pixels (D - x0)^2
    """
    sigma_shifted = shift * sigma                                                    # Table 9: shifted level
    x_t = x0 + sigma_shifted.view(-1, 1, 1, 1) * eps
    with trainlib.autocast(device):
        pred = losses.denoise(net, x_t, sigma_shifted, y)                            # x-prediction
    return losses.diffusion_loss(pred, x0, weight).mean()


def resolve_normalization(args, resume):
    """The pixel normalisation must be the one the encoder was pre-trained with (and that of a resumed run)."""
    if resume is not None:
        saved, source = resume["config"].get("normalize"), "the checkpoint being resumed"
    elif args.init and not args.from_scratch:
        saved, source = trainlib.load_checkpoint(args.init, "pretrain")["config"].get("normalize"), "the RCM checkpoint"
    else:
        saved, source = None, None
    if args.normalize is None:
        args.normalize = saved or CONFIG["normalize"]
    elif saved and saved != args.normalize:
        raise trainlib.UserError(f"--normalize {args.normalize} differs from the '{saved}' of {source}; "
                                 f"drop --normalize or pass --normalize {saved}")


def learning_rate(args, step):
    if args.lr_schedule == "warmup-cosine":
        return trainlib.warmup_cosine(step, args.steps, args.lr, args.warmup)
    return args.lr


@torch.no_grad()
def sample_images(ema, labels, args, num_classes, device, steps, seed=0):
    """Heun samples of the EMA model for `labels` (B,) -> uint8 (B, H, W, 3); image i uses the noise of seed (seed, i)."""
    size = args.image_size
    z = sample.initial_noise(seed, range(len(labels)), (3, size, size))[0].to(device)
    sigmas = sample.sampling_sigmas(steps, size)
    out = []
    for start in range(0, len(labels), 100):
        y = labels[start:start + 100].to(device)
        denoiser = sample.guided_denoiser(ema, y, num_classes, losses.resolution_shift(size),
                                          clamp=sample.clamp_range("data", args.normalize),
                                          autocast=lambda: trainlib.autocast(device))
        x = sample.heun_sample(denoiser, float(sigmas[0]) * z[start:start + 100], sigmas)
        out.append(data.to_uint8_hwc(x, args.normalize))
    return np.concatenate(out)


def write_sample_grid(ema, args, num_classes, device, step):
    """OUT/samples_<step>.png: one row per class (up to 10 classes, spread over the label range), 8 images each."""
    classes = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long()
    labels = classes.repeat_interleave(8)
    images = sample_images(ema, labels, args, num_classes, device, args.sample_steps)
    path = os.path.join(args.out, f"samples_{step:07d}.png")
    sample.save_grid(images, path, 8)
    return path


def main():
    args = parse_args()
    env = trainlib.init_distributed(args.device)
    device = env.device
    log = print if env.is_main else (lambda *a, **k: None)
    trainlib.check_output_dir(args.out)
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, env.world, args.micro_batch)
    if args.num_workers is None:
        args.num_workers = 8 if device.type == "cuda" else 0
    shift = losses.resolution_shift(args.image_size)

    # ---- data ----------------------------------------------------------------------------------------------------
    dataset = data.build_dataset(args.data, args.image_size, "train")
    num_classes = dataset.num_classes

    # ---- model, EMA, optimiser -----------------------------------------------------------------------------------
    ckpt_path = os.path.join(args.out, "ckpt_last.pt")
    resume = trainlib.load_checkpoint(ckpt_path, "diffusion") if os.path.exists(ckpt_path) else None
    resolve_normalization(args, resume)
    config = dict(stage="diffusion", model=args.model, image_size=args.image_size, num_classes=num_classes,
                  patch_size=models.patch_size_for(args.model, args.image_size), normalize=args.normalize,
                  data=args.data, seed=args.seed, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                  lr_schedule=args.lr_schedule, warmup=args.warmup, betas=list(CONFIG["betas"]),
                  weight_decay=args.weight_decay, no_weight_decay=["pos_embed", "cls_token"],
                  grad_clip=args.grad_clip, ema=args.ema, label_dropout=args.label_dropout, p_mean=args.p_mean,
                  p_std=args.p_std, num_scales=CONFIG["num_scales"], shift=shift, init=args.init,
                  from_scratch=args.from_scratch)
    if resume is not None:
        keys = RESUME_KEYS + (("steps",) if args.lr_schedule == "warmup-cosine" else ())
        trainlib.check_resume_compatible(resume["config"], config, keys)
        torch.manual_seed(args.seed)
        model = models.build_epg(args.model, args.image_size, num_classes)
        model.load_state_dict(resume["model"])
    else:
        model = trainlib.build_finetune_model(args, num_classes, log=log)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = trainlib.adamw(model, args.lr, CONFIG["betas"], args.weight_decay, ("pos_embed", "cls_token"), device)
    start_step = 0
    if resume is not None:
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        start_step = resume["step"]
        log(f"resumed from {ckpt_path} at step {start_step}")
    del resume
    net = trainlib.maybe_compile(model, args, device)
    if env.enabled:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    if env.is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        log(f"EPG-{args.model} @{args.image_size}px, {models.count_params(model) / 1e6:.2f}M parameters, "
            f"{num_classes} classes; batch {args.batch_size} ({env.world} x {accum} x {micro}), {args.steps} steps, "
            f"lr {args.lr} ({args.lr_schedule}), EMA {args.ema}, shift s = {shift:g}, device {device}")

    stream = data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="finetune",
                              mode=args.normalize, start_step=start_step, num_workers=args.num_workers,
                              pin_memory=device.type == "cuda")
    batches = iter(stream)
    metrics = trainlib.MetricsLog(os.path.join(args.out, "metrics.jsonl"), env.is_main)
    speed = trainlib.Throughput(device)
    bar = trainlib.progress(args.steps, start_step, env.is_main, "diffusion")
    own = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    loss = gnorm = torch.zeros((), device=device)

    def save(step):
        """Atomic OUT/ckpt_last.pt (+ ckpt_<step>.pt every --keep-every); never with a non-finite loss (with
        --skip-nonfinite, a non-finite step left the weights untouched, so they are saved)."""
        if not env.is_main:
            return
        if not args.skip_nonfinite:
            trainlib.check_finite(float(loss), step)
        elif not all(torch.isfinite(p).all() for p in model.parameters()):
            raise trainlib.NonFiniteLoss(f"the weights became non-finite at or before step {step}; the last good "
                                         f"checkpoint was kept. Lower --lr")
        state = {"stage": "diffusion", "config": config, "step": step, "model": trainlib.unwrap(net).state_dict(),
                 "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
        trainlib.save_checkpoint(ckpt_path, state)
        if args.keep_every and step % args.keep_every == 0:
            trainlib.save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), state)

    # ---- training loop -------------------------------------------------------------------------------------------
    for step in range(start_step, args.steps):
        trainlib.seed_step(args.seed, step, env.rank)
        lr = learning_rate(args, step)
        trainlib.set_lr(optimizer, lr)
        batch = next(batches)
        x0 = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)

        # Noise levels, label dropout and noise of the GLOBAL batch; this rank takes its slice.
        sigma, weight, drop, eps = step_randomness(args, step, device)
        sigma, weight, drop, eps = sigma[own].to(device), weight[own].to(device), drop[own].to(device), eps[own]
        y = torch.where(drop, torch.full_like(y, num_classes), y)                    # null class for CFG

        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for k in range(accum):
            part = slice(k * micro, (k + 1) * micro)
            sync = contextlib.nullcontext() if (not env.enabled or k == accum - 1) else net.no_sync()
            with sync:
                micro_loss = denoising_loss(net, x0[part], y[part], sigma[part], weight[part], eps[part], shift,
                                            device) / accum
                micro_loss.backward()
            loss = loss + micro_loss.detach()

        clip = args.grad_clip > 0 and not (args.lr_schedule == "warmup-cosine" and step < args.warmup)
        if clip:
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        else:
            gnorm = trainlib.grad_norm(model)
        if args.skip_nonfinite and not bool(torch.isfinite(loss) & torch.isfinite(gnorm)):
            log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
        else:
            optimizer.step()
            trainlib.ema_update(ema, model, args.ema)
            loss_sum, loss_count = loss_sum + loss, loss_count + 1                   # logged: applied steps only
        speed.add(args.batch_size)
        done = step + 1
        bar.update(1)

        if done % args.log_every == 0 or done == args.steps:
            mean_loss = trainlib.all_reduce_mean(loss_sum / max(loss_count, 1)).item()  # the one host sync
            trainlib.check_finite(mean_loss, done)
            record = dict(step=done, loss=mean_loss, lr=lr, grad_norm=float(gnorm), images_per_s=speed.rate(),
                          peak_memory_gb=trainlib.peak_memory_gb(device))
            metrics.write(**record)
            bar.set_postfix(loss=f"{mean_loss:.4g}", gnorm=f"{record['grad_norm']:.3g}")
            if env.is_main and not sys.stderr.isatty():
                print(f"step {done}: loss {mean_loss:.4g}, grad norm {record['grad_norm']:.3g}, lr {lr:.3g}, "
                      f"{record['images_per_s']:.1f} img/s", flush=True)
            loss_sum, loss_count = torch.zeros((), device=device), 0
        if done % args.ckpt_every == 0 or done == args.steps:
            save(done)
        if env.is_main and args.sample_every and done % args.sample_every == 0 and done != args.steps:
            log(f"step {done}: sample grid {write_sample_grid(ema, args, num_classes, device, done)}")
    bar.close()

    # ---- final samples and (embedded data set) metrics -----------------------------------------------------------
    if env.is_main:
        final_step = max(start_step, args.steps)
        log(f"final sample grid: {write_sample_grid(ema, args, num_classes, device, final_step)}")
        if args.data is None and args.eval_samples > 0:
            evaluate_embedded(ema, args, num_classes, device, metrics, final_step, log)


def evaluate_embedded(ema, args, num_classes, device, metrics, step, log):
    """Class accuracy and FD_ref of EMA samples (balanced labels) with the embedded data set's reference classifier
    (fid.embedded_metrics; NOT comparable to Inception FID). Skipped when fid.py does not offer it."""
    try:
        import fid
        evaluate = fid.embedded_metrics
    except (ImportError, AttributeError):
        log("fid.embedded_metrics is not available: embedded-data-set metrics skipped")
        return
    labels = sample.class_labels("balanced", args.eval_samples, num_classes)
    images = sample_images(ema, labels, args, num_classes, device, args.sample_steps, seed=1)
    try:
        result = evaluate(images, labels.numpy(), args.image_size, device=str(device))
    except NotImplementedError:
        log("fid.embedded_metrics is not implemented yet: embedded-data-set metrics skipped")
        return
    result = {k: float(v) for k, v in result.items() if isinstance(v, (int, float, np.floating, np.integer))}
    metrics.write(step=step, eval_samples=args.eval_samples, sample_steps=args.sample_steps,
                  **{f"eval_{k}": v for k, v in result.items()})
    log(f"embedded-data-set metrics of {args.eval_samples} EMA samples (Heun {args.sample_steps} steps): "
        + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    trainlib.cli_main(main)
