"""Consistency fine-tuning of EPG: a one-step generator from a pre-trained RCM encoder (paper §2, §3.3, Table 4).

The pre-trained encoder (projector dropped) and a fresh decoder form f_theta with the boundary condition of eq. 4 at
the shifted sigma~_min = s * 0.002 (s = image_size / 64, Table 9). Each step draws ECT's time pair (Table 9):
t ~ lognormal(-0.4, 1.6), r = p(r|t) of the current stage, both shifted, and one eps per image (eq. 6), and
minimises, per image (losses.consistency_loss + losses.aux_loss):

    1/(t~ - r~) * d( f_theta(x + t~ eps, t~), f_sg(theta)(x + r~ eps, r~) )  +  NT-Xent( W(f_theta(x_t, t~)), sg W(x) )

with d the pseudo-Huber distance, the target computed by the current weights in train mode with the same dropout
masks, and W a frozen copy of the pre-trained RCM (eq. 9). Table 11: AdamW (0.9, 0.99), wd 0.01, lr 1e-4 / 3e-5 /
8e-6 (steps 400k, 500k), no clipping, EMA 0.9999, dropout 0.5 after each decoder attention block, batch 1024, 700k.

    python train_consistency.py --model T --init runs/pt/ckpt_last.pt --out runs/cm          # CPU, minutes
    python sample.py --ckpt runs/cm/ckpt_last.pt --steps 1                                   # one-step samples
    torchrun --nproc_per_node=8 train_consistency.py --model L --data /data/imagenet256 \\
        --init runs/rcm_l/ckpt_last.pt --out runs/cm_l                                       # Table 4
    ... --aux-features projector --weight-decay 0.03 --warmup 10000                         # the official variant
"""
import contextlib
import copy
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import trainlib

CONFIG = dict(
    model="L",                 # EPG-L/16, the consistency model of Table 4 (one-step FID 8.82)
    image_size=256,
    batch_size=1024,           # Table 11 (the official script: 256)
    steps=700_000,             # Table 11 / §4 "700K steps (560 epochs)" (official config: 1M)
    lr=1e-4,                   # Table 11: step-wise 1e-4 -> 3e-5 at 400k -> 8e-6 at 500k
    lr_milestones=[400_000, 500_000],
    lr_factors=[0.3, 0.08],
    warmup=0,                  # not in the paper; official code: 10k steps linear from 0
    betas=[0.9, 0.99],         # Table 11
    weight_decay=0.01,         # Table 11 (official config 0.03); none on pos_embed / cls_token
    ema=0.9999,                # Table 11
    dropout=0.5,               # Table 11 dagger: after each decoder attention block, none in the encoder
    stage_interval=100_000,    # ECT stage = 1 + floor(step / 100k) in the official code (7 stages in 700k steps)
    p_mean=-0.4, p_std=1.6,    # Table 9: t ~ lognormal(-0.4, 1.6)
    huber_c=0.06,              # pseudo-Huber constant of the official config
    aux_weight=1.0,            # eq. 9 added with weight 1 (0 = Table 13a "w/o aux")
    aux_tau=0.1,               # temperature of eq. 9: not stated in the paper; the official code's 0.1
    aux_features="encoder",    # §3.3: W = the pre-trained encoder without projector (official: projector)
    label_dropout=0.0,         # class-conditional, no label dropout (official consistency config)
    out="runs/cm",
    ckpt_every=1000, keep_every=50_000, log_every=100,
)
PRESETS = {
    # a 2-core CPU: minutes instead of 156 H200-hours. A constant lr without dropout, and t's proposal centred
    # higher, as for the tiny diffusion model (the shift s = 0.5 halves every level; BENCHMARKS.md, "A demo that
    # draws its classes"); the ECT stage interval stays 100k steps, so a CPU run stays in stage 1 (squeezing the 7
    # stages into a short run made the tiny model worse)
    "T": dict(image_size=32, batch_size=32, steps=1200, lr=5e-4, lr_milestones=[], lr_factors=[], ema=0.995,
              dropout=0.0, p_mean=1.2, ckpt_every=200, keep_every=0, log_every=25),
}
RESUME_KEYS = ("model", "image_size", "batch_size", "data_id", "seed", "normalize", "from_scratch", "dropout",
               "aux_weight", "aux_features", "aux_tau", "stage_interval", "huber_c", "p_mean", "p_std",
               "label_dropout", "lr", "lr_milestones", "lr_factors", "warmup", "weight_decay", "ema", "betas")


def parse_args(argv=None):
    p = trainlib.parser("Consistency fine-tuning of EPG (paper eq. 4, 5, 9; Tables 4, 9, 11).", CONFIG)
    p.add_argument("--init", default=None, help="RCM checkpoint of pretrain.py: encoder init and auxiliary network W")
    p.add_argument("--from-scratch", action="store_true",
                   help="random encoder, no pre-training (Table 6 ablation; 'NaN' in the paper)")
    p.add_argument("--init-diffusion", default=None,
                   help="start f_theta from the EMA weights of a train_diffusion.py checkpoint (ECT's start, not "
                        "the paper's; make demo), W still from --init")
    p.add_argument("--aux-ckpt", default=None, help="RCM checkpoint for W of eq. 9 (none: --init)")
    p.add_argument("--aux-weight", type=float, default=CONFIG["aux_weight"], help="weight of eq. 9 (0: off)")
    p.add_argument("--aux-tau", type=trainlib.positive_float, default=CONFIG["aux_tau"], help="temperature of eq. 9")
    p.add_argument("--aux-features", choices=("encoder", "projector"), default=CONFIG["aux_features"],
                   help="encoder: LN'd CLS feature, the prediction at t~ (paper); projector: projector outputs, "
                        "both at sigma~_min (official code)")
    p.add_argument("--betas", type=float, nargs=2, default=CONFIG["betas"], metavar=("BETA1", "BETA2"), help="AdamW betas")
    p.add_argument("--ema", type=float, default=CONFIG["ema"], help="EMA decay of the sampling weights")
    p.add_argument("--dropout", type=float, default=CONFIG["dropout"], help="dropout after each decoder attention block")
    p.add_argument("--warmup", type=int, default=CONFIG["warmup"], help="linear learning-rate warm-up steps")
    p.add_argument("--lr-milestones", type=float, nargs="*", default=CONFIG["lr_milestones"],
                   help="steps at which the lr drops (a value below 1 is a fraction of --steps)")
    p.add_argument("--lr-factors", type=float, nargs="*", default=CONFIG["lr_factors"],
                   help="lr multipliers from each milestone on")
    p.add_argument("--stage-interval", type=trainlib.positive_int, default=CONFIG["stage_interval"],
                   help="steps per ECT stage of p(r|t): stage = 1 + floor(step / interval)")
    p.add_argument("--p-mean", type=float, default=CONFIG["p_mean"], help="mean of ln t of the noise proposal")
    p.add_argument("--p-std", type=trainlib.positive_float, default=CONFIG["p_std"], help="std of ln t")
    p.add_argument("--huber-c", type=trainlib.positive_float, default=CONFIG["huber_c"], help="pseudo-Huber constant")
    p.add_argument("--label-dropout", type=float, default=CONFIG["label_dropout"],
                   help="probability of replacing the class by the null class")
    p.add_argument("--normalize", choices=data.NORMALIZATIONS, default=None,
                   help="pixel normalisation (none: that of the --init checkpoint; simple from scratch)")
    args = trainlib.parse(p, argv, CONFIG, PRESETS)
    if len(args.lr_milestones) != len(args.lr_factors):
        raise trainlib.UserError(f"--lr-milestones has {len(args.lr_milestones)} values but --lr-factors "
                                 f"{len(args.lr_factors)}; give one factor per milestone")
    args.lr_milestones = [round(m * args.steps) if m < 1 else int(m) for m in args.lr_milestones]
    if not (0 <= args.dropout < 1 and 0 <= args.label_dropout < 1 and 0 <= args.ema < 1):
        raise trainlib.UserError("--dropout, --label-dropout and --ema must be in [0, 1)")
    return args


def aux_network(args, rcm, log):
    """The frozen copy W of the pre-trained RCM (eq. 9): eval mode, no gradient, outside the optimiser and DDP."""
    if args.aux_ckpt:
        rcm = trainlib.load_checkpoint(args.aux_ckpt, "pretrain")
    if args.aux_weight == 0 or rcm is None:
        if args.aux_weight:
            log("note: --from-scratch without --aux-ckpt: no pre-trained W exists, so the auxiliary loss is off")
        return None
    W = models.build_rcm(args.model, args.image_size, proj_dim=rcm["config"].get("proj_dim"))
    try:
        W.load_state_dict(rcm["model"])
    except RuntimeError as e:
        raise trainlib.UserError(f"the RCM for W does not fit RCM-{args.model} at {args.image_size}px "
                                 f"({str(e).splitlines()[0]}); pass a matching --init/--aux-ckpt") from None
    log(f"auxiliary network W: RCM-{args.model} (step {rcm['step']}), {args.aux_features} features")
    return W.eval().requires_grad_(False)


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
    sigma_min = shift * losses.SIGMA_MIN                                          # the shifted boundary of eq. 4

    # ---- data, output directory, resume ----
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)    # clean images + flips (Table 11)
    num_classes = dataset.num_classes
    trainlib.prepare_output(args.out, env.main)
    ckpt_path = os.path.join(args.out, "ckpt_last.pt")
    resume = trainlib.load_checkpoint(ckpt_path, "consistency") if os.path.exists(ckpt_path) else None
    if resume is not None and resume["step"] >= args.steps:
        log(f"{ckpt_path} is already at step {resume['step']} >= --steps {args.steps}; nothing to do")
        return
    rcm = trainlib.load_init(args)
    trainlib.inherit(args, "normalize", (resume or rcm or {"config": {}})["config"], "--init or the resumed run")
    args.normalize = args.normalize or "simple"

    # ---- networks: f_theta (encoder from the RCM, fresh decoder), its EMA, the frozen W of eq. 9 ----
    torch.manual_seed(args.seed)
    model = models.build_epg(args.model, args.image_size, num_classes, args.dropout)
    if rcm is not None:
        try:
            models.load_encoder_from_rcm(model, rcm["model"])
        except ValueError as e:
            raise trainlib.UserError(f"--init {args.init} does not fit EPG-{args.model} at {args.image_size}px: {e}") from None
    if args.init_diffusion and resume is None:                # ECT's start: the whole network of a diffusion run
        dm = trainlib.load_checkpoint(args.init_diffusion, "diffusion")
        if dm["config"].get("normalize") != args.normalize:
            raise trainlib.UserError(f"--init-diffusion {args.init_diffusion} was trained with --normalize "
                                     f"{dm['config'].get('normalize')}, this run uses {args.normalize}; pass "
                                     f"--normalize {dm['config'].get('normalize')} or the diffusion run's --init")
        try:
            model.load_state_dict(dm["ema"])
        except RuntimeError as e:
            raise trainlib.UserError(f"--init-diffusion {args.init_diffusion} does not fit EPG-{args.model} at "
                                     f"{args.image_size}px ({str(e).splitlines()[0]})") from None
        log(f"f_theta starts from the diffusion EMA of {args.init_diffusion} (step {dm['step']})")
    W = aux_network(args, rcm, log)
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "consistency", "num_classes": num_classes, "patch_size": patch_size,
              "sigma_min_shifted": sigma_min, "aux_active": W is not None, "data_id": data.identity(dataset), "class_counts": data.class_counts(dataset)}
    model.to(device)
    W = W.to(device) if W is not None else None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = trainlib.adamw(model, args.lr, tuple(args.betas), args.weight_decay, ("pos_embed", "cls_token"), device)
    step = 0
    if resume is not None:
        trainlib.check_resume(resume["config"], config, RESUME_KEYS)
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    del resume, rcm
    target = trainlib.compiled(model, args, device)      # the stop-gradient pass: same kernels, same dropout masks
    net = DDP(target, device_ids=[device.index] if device.type == "cuda" else None) if env.distributed else target
    if W is not None:             # W(x_in, c) of eq. 9: LN'd CLS feature (paper) or projector output (official)
        W_fn = trainlib.compiled(W.features if args.aux_features == "encoder" else (lambda x, c: W(x, c)[0]),
                                 args, device)
    rng_devices = [device.index] if device.type == "cuda" else []
    if env.main:
        trainlib.write_json(os.path.join(args.out, "config.json"), config)
    schedule = f"x {args.lr_factors} from {args.lr_milestones}" if args.lr_milestones else "constant"
    log(f"EPG-{args.model}/{patch_size} at {args.image_size}px, shift s = {shift:g}, {env.world} process(es) on "
        f"{device}, batch {args.batch_size} = {env.world} x {accum} x {micro}; lr {args.lr} ({schedule}), EMA "
        f"{args.ema}, dropout {args.dropout}, {args.steps} steps; auxiliary loss "
        + (f"weight {args.aux_weight}, tau {args.aux_tau}, {args.aux_features}" if W is not None else "off"))

    batches = iter(data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="finetune",
                                    mode=args.normalize, start_step=step, num_workers=trainlib.num_workers(args, env),
                                    pin_memory=device.type == "cuda"))
    metrics = trainlib.MetricsLog(os.path.join(args.out, "metrics.jsonl"), env.main, resume_step=step)
    speed = trainlib.Throughput(device)
    bar = trainlib.progress(args.steps, step, env.main, "consistency")
    mine = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    sums, applied = torch.zeros(3, device=device), 0                             # consistency, aux, total

    def save(path):
        if not all(p.isfinite().all() for p in model.parameters()):
            raise trainlib.UserError(f"the weights became non-finite at or before step {step}; the last good "
                                     f"checkpoint was kept. Lower --lr or pass --skip-nonfinite")
        trainlib.save_checkpoint(path, {"stage": "consistency", "config": config, "step": step,
                                        "model": model.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": optimizer.state_dict()})

    # ---- the loop ----
    model.train()
    while step < args.steps:
        batch = next(batches)           # first: creating the loader's iterator must precede the step's seeding
        trainlib.seed_step(args.seed, step, env.rank)                             # dropout masks: f(seed, step, rank)
        trainlib.set_lr(optimizer, trainlib.step_lr(step, args.lr, args.lr_milestones, args.lr_factors, args.warmup))
        x0, y = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        # ECT's (t, r) (unshifted), eps and label dropout for the GLOBAL batch; this rank takes its slice
        stage = losses.ect_stage(step, args.stage_interval)
        t, r = losses.ct_time_pair(args.batch_size, stage, trainlib.step_generator(args.seed, step, "cpu", 0),
                                   args.p_mean, args.p_std)
        eps = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device,
                          generator=trainlib.step_generator(args.seed, step, device, 1))[mine]
        drop = torch.rand(args.batch_size, generator=trainlib.step_generator(args.seed, step, "cpu", 2))[mine]
        t, r, drop = (v.to(device, non_blocking=True) for v in (shift * t[mine], shift * r[mine], drop))   # shifted
        y = torch.where(drop < args.label_dropout, torch.full_like(y, num_classes), y)

        with trainlib.autocast(device):                                           # sg W(x): keys of the whole batch
            keys = losses.aux_keys(W_fn, x0, sigma_min) if W is not None else None
        step_terms = torch.zeros(3, device=device)
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            with net.no_sync() if (env.distributed and m < accum - 1) else contextlib.nullcontext():
                with trainlib.autocast(device):
                    cm, prediction = losses.consistency_loss(net, target, x0[part], y[part], t[part], r[part],
                                                             eps[part], sigma_min, args.huber_c, rng_devices)
                    aux = (losses.aux_loss(W_fn, prediction, keys, t[part], sigma_min, args.aux_tau,
                                           args.aux_features, first=mine.start + m * micro)
                           if W is not None else torch.zeros_like(cm))
                loss = (cm + args.aux_weight * aux).mean()
                (loss / accum).backward()
            step_terms += torch.stack([cm.mean(), aux.mean(), loss]).detach().float() / accum

        log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        norm = trainlib.grad_norm(model) if log_now else None
        if args.skip_nonfinite and not (torch.isfinite(trainlib.all_reduce_mean(step_terms.clone())).all()
                                        & torch.isfinite(trainlib.grad_norm(model))).item():
            log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
        else:
            optimizer.step()
            trainlib.ema_update(ema, model, args.ema)
            sums, applied = sums + step_terms, applied + 1
        optimizer.zero_grad(set_to_none=True)
        step += 1
        speed.add(args.batch_size)
        bar.update(1)

        if log_now:
            mean = (trainlib.all_reduce_mean(sums) / max(applied, 1)).tolist()
            trainlib.check_finite(mean[2], step)
            metrics.write(step=step, loss=mean[2], loss_consistency=mean[0], loss_aux=mean[1], stage=stage,
                          lr=optimizer.param_groups[0]["lr"], grad_norm=float(norm), images_per_s=speed.rate(),
                          peak_memory_gb=trainlib.peak_memory_gb(device))
            bar.set_postfix(loss=f"{mean[2]:.4f}", cm=f"{mean[0]:.4f}", aux=f"{mean[1]:.3f}", stage=stage)
            sums, applied = torch.zeros(3, device=device), 0
        stop = trainlib.preempted(env)
        if env.main and (step % args.ckpt_every == 0 or step == args.steps or stop):
            save(ckpt_path)
        if env.main and args.keep_every and step % args.keep_every == 0:
            save(os.path.join(args.out, f"ckpt_{step:07d}.pt"))
        if stop:
            raise trainlib.Preempted(f"SIGTERM: stopped after step {step}, checkpoint {ckpt_path}; rerun to resume")
    bar.close()
    log(f"done: {step} steps, checkpoint {ckpt_path}")


if __name__ == "__main__":
    trainlib.cli_main(main, data.DataError)
