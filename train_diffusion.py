"""Diffusion fine-tuning of EPG (paper §3.3 "Diffusion model", eq. 1, Tables 9 and 11; the main results, Tables 1-3).

The pre-trained RCM encoder (projector discarded) and a fresh adaLN-Zero decoder are trained end to end as an
x-prediction denoiser (losses.diffusion_loss):

    t_n ~ lognormal(-1.2, 1.6) snapped to the N = 1280 Karras grid        (Table 9, dagger; unshifted)
    x_t = x + s t_n eps,  s = image_size / 64                              (Table 9, resolution shift)
    D = F(c_in(s t_n) x_t, c(s t_n), y),  y -> null class w.p. 0.1        (x-prediction; CFG label dropout)
    L = E[ 1/(t_n - t_{n-1}) * mean_pixels (D - x)^2 ]                     (eq. 1 with Table 9's weighting)

AdamW (0.9, 0.999), lr 1e-4, weight decay 0.01 (none on pos_embed and cls_token), grad-norm clip 0.5, EMA 0.9999,
batch 1024, 1M steps (Table 11). The checkpoint holds the online and EMA weights; sample.py uses the EMA.

    python train_diffusion.py --model T --init runs/pt/ckpt_last.pt --out runs/dm                # CPU, minutes
    torchrun --nproc_per_node=8 train_diffusion.py --model XL --data /data/imagenet256 \\
        --init runs/rcm_b/ckpt_last.pt --out runs/dm_xl                                           # Table 1
    ... --lr-schedule warmup-cosine                                                               # the official run
Rerunning the same command after an interruption resumes from OUT/ckpt_last.pt.
"""
import contextlib
import copy
import os
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import trainlib

CONFIG = dict(
    model="XL",                 # EPG-XL/16, the official ImageNet-256 script (Table 1)
    image_size=256,
    batch_size=1024,            # Table 11 (global)
    steps=1_000_000,            # Table 11 / §4: 1M steps (800 epochs); 2M for EPG-G
    lr=1e-4,                    # Table 11, constant (no schedule stated)
    lr_schedule="constant",     # official code: warmup-cosine (linear warm-up, then cosine to 0)
    warmup=10_000,              # official code's warm-up (warmup-cosine only)
    betas=[0.9, 0.999],         # Table 11
    weight_decay=0.01,          # Table 11; no decay on pos_embed and cls_token (official parameter groups)
    grad_clip=0.5,              # Table 11; the official code clips only after the warm-up
    ema=0.9999,                 # Table 11, every step from step 0 (official)
    label_dropout=0.1,          # not stated in the paper; the official code's rate (null class = num_classes)
    p_mean=-1.2, p_std=1.6,     # Table 9: lognormal(-1.2, 1.6) noise proposal, snapped to the N = 1280 grid
    out="runs/dm",
    ckpt_every=5000, keep_every=100_000, log_every=100,
    sample_every=5000,          # the official code writes a sample grid every 5k steps
    sample_steps=16,            # Heun steps of the in-training grids and the final embedded-data-set evaluation
    eval_samples=1000,          # EMA samples scored by data.embedded_metrics at the end (embedded data set only)
    sampling={},                # guidance of the grids, recorded as sample.py's defaults (empty: the paper's, §4)
)
PRESETS = {
    # a 2-core CPU: a short, larger-lr run with a faster EMA and small batches (batch 8 learns more per image than
    # 32 or 16 at this size). At 32^2 the shift s = 0.5 halves every level, and with Table 9's proposal a tiny run
    # almost never trains where the sampler lays out the image: the proposal is centred higher (BENCHMARKS.md,
    # "The tiny preset")
    "T": dict(image_size=32, batch_size=8, steps=7000, lr=1e-3, ema=0.995, ckpt_every=1000, keep_every=0,
              log_every=100, sample_every=2000, eval_samples=200, p_mean=0.4,
              # recorded in the checkpoint as sample.py's defaults: at 32^2 the paper's interval guides only
              # sigma~ <= 0.8, where the layout is already fixed; CFG 4.0 on every level wins on class accuracy
              # and FD_ref alike (BENCHMARKS.md, "where guidance acts")
              sampling=dict(cfg_scale=4.0, cfg_interval=[0.0, 80.0])),
}
RESUME_KEYS = ("model", "image_size", "batch_size", "data_id", "seed", "normalize", "lr", "lr_schedule", "warmup",
               "weight_decay", "grad_clip", "ema", "label_dropout", "p_mean", "p_std", "num_classes")


def parse_args(argv=None):
    p = trainlib.parser("Diffusion fine-tuning of EPG (paper §3.3, eq. 1, Tables 9 and 11).", CONFIG)
    p.add_argument("--init", default=None, help="RCM checkpoint of pretrain.py whose encoder initialises EPG")
    p.add_argument("--from-scratch", action="store_true", help="random encoder (the ablation without pre-training)")
    p.add_argument("--lr-schedule", choices=("constant", "warmup-cosine"), default=CONFIG["lr_schedule"],
                   help="constant (paper) or the official code's linear warm-up + cosine decay to 0")
    p.add_argument("--warmup", type=int, default=CONFIG["warmup"], help="warm-up steps of warmup-cosine")
    p.add_argument("--grad-clip", type=float, default=CONFIG["grad_clip"], help="grad-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=CONFIG["ema"], help="EMA decay")
    p.add_argument("--p-mean", type=float, default=CONFIG["p_mean"], help="mean of ln t of the noise proposal")
    p.add_argument("--p-std", type=trainlib.positive_float, default=CONFIG["p_std"], help="std of ln t of the proposal")
    p.add_argument("--label-dropout", type=float, default=CONFIG["label_dropout"],
                   help="probability of replacing the label by the null class (for classifier-free guidance)")
    p.add_argument("--normalize", choices=data.NORMALIZATIONS, default=None,
                   help="pixel normalisation (none: that of the --init checkpoint; simple from scratch)")
    p.add_argument("--sample-every", type=int, default=CONFIG["sample_every"],
                   help="write OUT/samples_<step>.png (EMA, Heun) every this many steps (0: only at the end)")
    p.add_argument("--sample-steps", type=trainlib.positive_int, default=CONFIG["sample_steps"],
                   help="Heun steps of the sample grids and the final evaluation")
    p.add_argument("--eval-samples", type=int, default=CONFIG["eval_samples"],
                   help="EMA samples scored at the end on the embedded data set (0: none)")
    args = trainlib.parse(p, argv, CONFIG, PRESETS)
    if not 0.0 <= args.label_dropout < 1.0 or not 0.0 <= args.ema < 1.0:
        raise trainlib.UserError("--label-dropout and --ema must be in [0, 1)")
    return args


@torch.no_grad()
def sample_grid(ema, args, num_classes, device, path, labels=None, seed=0):
    """EMA samples (Heun, --sample-steps, guidance of args.sampling) for `labels` (default: up to 10 classes x 8)
    -> uint8 (N, H, W, 3); with `path`, also a PNG grid with one row per class."""
    if labels is None:
        labels = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long().repeat_interleave(8)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), 3, args.image_size, args.image_size, generator=g)
    sigmas = losses.sampling_sigmas(args.sample_steps, args.image_size)
    shift, bounds = losses.resolution_shift(args.image_size), data.data_range(args.normalize)
    out, bar = [], trainlib.progress(len(labels), 0, True, "sampling")
    for start in range(0, len(labels), 100):
        y = labels[start:start + 100].to(device)
        denoiser = losses.guided_denoiser(ema, y, num_classes, shift, clamp=bounds,
                                          autocast=lambda: trainlib.autocast(device), **args.sampling)
        out.append(data.to_uint8_hwc(losses.heun_sample(denoiser, sigmas[0] * z[start:start + 100].to(device), sigmas),
                                     args.normalize))
        bar.update(len(y))
    bar.close()
    images = np.concatenate(out)
    if path:
        data.save_grid(images, path, columns=8)
    return images


def main(argv=None):
    args = parse_args(argv)
    env = trainlib.init_distributed(args.device)
    device, log = env.device, env.log
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, env.world, args.micro_batch)
    try:
        patch_size = models.patch_size_for(args.model, args.image_size)
    except ValueError as e:
        raise trainlib.UserError(str(e)) from None
    shift = losses.resolution_shift(args.image_size)

    # ---- data, output directory, resume ----
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)
    num_classes = dataset.num_classes
    trainlib.prepare_output(args.out, env.main)
    ckpt_path = os.path.join(args.out, "ckpt_last.pt")
    resume = trainlib.load_checkpoint(ckpt_path, "diffusion") if os.path.exists(ckpt_path) else None
    if resume is not None and resume["step"] >= args.steps:
        log(f"{ckpt_path} is already at step {resume['step']} >= --steps {args.steps}; nothing to do")
        return
    if resume is not None:
        trainlib.inherit(args, "normalize", resume["config"], "the run being resumed")
    elif args.init:
        trainlib.inherit(args, "normalize", trainlib.load_checkpoint(args.init, "pretrain")["config"], "--init")
    args.normalize = args.normalize or "simple"
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "diffusion", "num_classes": num_classes, "patch_size": patch_size, "shift": shift,
              "data_id": data.identity(dataset), "class_counts": data.class_counts(dataset), "no_weight_decay": ["pos_embed", "cls_token"]}
    if resume is not None:
        trainlib.check_resume(resume["config"], config,
                              RESUME_KEYS + (("steps",) if args.lr_schedule == "warmup-cosine" else ()))

    # ---- model, EMA, optimiser ----
    if resume is not None:
        model = models.build_epg(args.model, args.image_size, num_classes)
        model.load_state_dict(resume["model"])
    else:                                  # the encoder of the RCM (projector dropped, §3.3), decoder fresh
        rcm = trainlib.load_init(args)
        torch.manual_seed(args.seed)
        model = models.build_epg(args.model, args.image_size, num_classes)
        if rcm is not None:
            try:
                models.load_encoder_from_rcm(model, rcm["model"])
            except ValueError as e:
                raise trainlib.UserError(f"--init {args.init} does not fit EPG-{args.model} at {args.image_size}px: {e}") from None
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = trainlib.adamw(model, args.lr, tuple(args.betas), args.weight_decay, ("pos_embed", "cls_token"), device)
    start = 0
    if resume is not None:
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["step"]
        log(f"resumed from {ckpt_path} at step {start}")
    del resume
    net = trainlib.compiled(model, args, device)
    if env.distributed:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    ema_net = trainlib.compiled(ema, args, device)                                # the sample grids, compiled too
    if env.main:
        trainlib.write_json(os.path.join(args.out, "config.json"), config)
    log(f"EPG-{args.model}/{patch_size} at {args.image_size}px, {models.count_params(model) / 1e6:.2f}M parameters, "
        f"{num_classes} classes; batch {args.batch_size} ({env.world} x {accum} x {micro}), {args.steps} steps, "
        f"lr {args.lr} ({args.lr_schedule}), EMA {args.ema}, shift s = {shift:g}, {device}")

    batches = iter(data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="finetune",
                                    mode=args.normalize, start_step=start, num_workers=trainlib.num_workers(args, env),
                                    pin_memory=device.type == "cuda"))
    metrics = trainlib.MetricsLog(os.path.join(args.out, "metrics.jsonl"), env.main, resume_step=start)
    speed, t0 = trainlib.Throughput(device), time.perf_counter()
    bar = trainlib.progress(args.steps, start, env.main, "diffusion")
    mine = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    loss_sum, applied = torch.zeros((), device=device), 0
    loss = torch.zeros((), device=device)

    def save(path, step):
        if not args.skip_nonfinite:
            trainlib.check_finite(float(loss), step)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise trainlib.UserError(f"the weights became non-finite at or before step {step}; the last good "
                                     f"checkpoint was kept. Lower --lr")
        trainlib.save_checkpoint(path, {"stage": "diffusion", "config": config, "step": step,
                                        "model": model.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": optimizer.state_dict()})

    # ---- the loop ----
    for step in range(start, args.steps):
        trainlib.seed_step(args.seed, step, env.rank)
        lr = (trainlib.warmup_cosine(step, args.steps, args.lr, args.warmup) if args.lr_schedule == "warmup-cosine"
              else args.lr)
        trainlib.set_lr(optimizer, lr)
        batch = next(batches)
        x0, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        # t_n, its weight, label dropout and eps for the GLOBAL batch (Table 9); this rank takes its slice
        g = trainlib.step_generator(args.seed, step, "cpu", 0)
        sigma, weight = losses.diffusion_noise(args.batch_size, g, args.p_mean, args.p_std)
        drop = torch.rand(args.batch_size, generator=g) < args.label_dropout
        eps = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device,
                          generator=trainlib.step_generator(args.seed, step, device, 1))[mine]
        sigma, weight, drop = (v.to(device, non_blocking=True) for v in (shift * sigma[mine], weight[mine], drop[mine]))
        y = torch.where(drop, torch.full_like(y, num_classes), y)                    # null class for CFG

        loss = torch.zeros((), device=device)
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            with net.no_sync() if (env.distributed and m < accum - 1) else contextlib.nullcontext():
                with trainlib.autocast(device):
                    micro_loss = losses.diffusion_loss(net, x0[part], y[part], sigma[part], weight[part],
                                                       eps[part]).mean() / accum
                micro_loss.backward()
            loss = loss + micro_loss.detach()
        clip = args.grad_clip > 0 and not (args.lr_schedule == "warmup-cosine" and step < args.warmup)
        gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip) if clip
                 else trainlib.grad_norm(model))
        if args.skip_nonfinite and not bool(torch.isfinite(loss) & torch.isfinite(gnorm)):
            log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
        else:
            optimizer.step()
            trainlib.ema_update(ema, model, args.ema)
            loss_sum, applied = loss_sum + loss, applied + 1
        optimizer.zero_grad(set_to_none=True)
        speed.add(args.batch_size)
        bar.update(1)
        done = step + 1

        if done % args.log_every == 0 or done == args.steps:
            mean_loss = trainlib.all_reduce_mean(loss_sum / max(applied, 1)).item()
            trainlib.check_finite(mean_loss, done)
            metrics.write(step=done, loss=mean_loss, lr=lr, grad_norm=float(gnorm), images_per_s=speed.rate(),
                          peak_memory_gb=trainlib.peak_memory_gb(device))
            bar.set_postfix(loss=f"{mean_loss:.4g}", gnorm=f"{float(gnorm):.3g}")
            loss_sum, applied = torch.zeros((), device=device), 0
        stop = trainlib.preempted(env)
        if env.main and (done % args.ckpt_every == 0 or done == args.steps or stop):
            save(ckpt_path, done)
        if env.main and args.keep_every and done % args.keep_every == 0:
            save(os.path.join(args.out, f"ckpt_{done:07d}.pt"), done)
        if stop:
            raise trainlib.Preempted(f"SIGTERM: stopped after step {done}, checkpoint {ckpt_path}; rerun to resume")
        if env.main and args.sample_every and done % args.sample_every == 0 and done != args.steps:
            sample_grid(ema_net, args, num_classes, device, os.path.join(args.out, f"samples_{done:07d}.png"))
    bar.close()

    # ---- final grid and (embedded data set) metrics, sized to the run ----
    if env.main:
        final = max(start, args.steps)
        train_s = time.perf_counter() - t0
        per_image = 2 * args.sample_steps / 3 * train_s / max((args.steps - start) * args.batch_size, 1)
        n_eval = args.eval_samples if args.data is None else 0
        if (80 + n_eval) * per_image > max(train_s, 60):
            log(f"end-of-run sampling skipped: about {(80 + n_eval) * per_image / 60:.0f} min on {device}, longer "
                f"than the training itself; sample with: python sample.py --ckpt {ckpt_path}")
            return
        path = os.path.join(args.out, f"samples_{final:07d}.png")
        sample_grid(ema_net, args, num_classes, device, path)
        log(f"final sample grid: {path}")
        if n_eval:
            labels = torch.arange(n_eval) * num_classes // n_eval                     # balanced
            images = sample_grid(ema_net, args, num_classes, device, None, labels, seed=1)
            result = data.embedded_metrics(images, labels.numpy(), args.image_size, device=str(device))
            metrics.write(step=final, eval_samples=n_eval, sample_steps=args.sample_steps,
                          **{f"eval_{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))})
            log(f"embedded-data-set metrics of {n_eval} EMA samples (Heun {args.sample_steps}): "
                + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float))))


if __name__ == "__main__":
    trainlib.cli_main(main, data.DataError)
