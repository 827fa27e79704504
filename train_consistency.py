"""Consistency fine-tuning of EPG: a one-step generator from a pre-trained RCM encoder (paper §2, §3.3, Table 4).

The pre-trained encoder (projector dropped) and a fresh decoder form f_theta with the boundary condition of eq. 4 at
the shifted sigma~_min = s * 0.002 (s = image_size / 64, Table 9). Each step draws ECT's time pair (Table 9):
t ~ lognormal(-0.4, 1.6), r = p(r|t) of the current stage, both shifted, and one eps per image (eq. 6), and
minimises, per image (losses.consistency_loss + losses.aux_loss):

    1/(t~ - r~) * d( f_theta(x + t~ eps, t~), f_sg(theta)(x + r~ eps, r~) )  +  NT-Xent( W(f_theta(x_t, t~)), sg W(x) )

with d the pseudo-Huber distance, the target computed by the current weights in train mode with the same dropout
masks, and W a frozen copy of the pre-trained RCM (eq. 9). Optimiser settings: CONFIG (Table 11).

    python train_consistency.py --model T --init runs/pt/ckpt_last.pt --out runs/cm          # CPU, minutes
    python sample.py --ckpt runs/cm/ckpt_last.pt --steps 1                                   # one-step samples
    torchrun --nproc_per_node=8 train_consistency.py --model L --data /data/imagenet256 \\
        --init runs/rcm_l/ckpt_last.pt --out runs/cm_l                                       # Table 4
    ... --aux-features projector --weight-decay 0.03 --warmup 10000                         # the official variant
    ... --aux-weight 0 | --from-scratch [--aux-ckpt RCM]                                    # Table 12a
"""
import copy
import os

import torch

import data
import evaluate
import losses
import models
import rundir
import trainlib

CONFIG = dict(
    model="L",                 # EPG-L/16, the consistency model of Table 4 (one-step FID 8.82)
    image_size=256,            # image side in pixels (Table 7: 256; EPG-L/32 at 512)
    batch_size=1024,           # Table 11 (the official script: 256)
    steps=700_000,             # Table 11 / §4 "700K steps (560 epochs)" (official config: 1M)
    lr=1e-4,                   # Table 11: step-wise 1e-4 -> 3e-5 at 400k -> 8e-6 at 500k
    lr_schedule="step",        # Table 11: the lr times the factor of the last milestone passed
    lr_milestones=[400_000, 500_000],  # steps at which the lr drops (a value below 1 is a fraction of --steps)
    lr_factors=[0.3, 0.08],    # lr multipliers from each milestone on
    warmup=0,                  # not in the paper; official code: 10k steps linear from 0
    weight_decay=0.01,         # Table 11 (official config 0.03); none on pos_embed / cls_token
    betas=[0.9, 0.99],         # Table 11
    grad_clip=0.0,             # Table 11: no clipping (0: off)
    ema=0.9999,                # Table 11
    dropout=0.5,               # Table 11 dagger: after each decoder attention block, none in the encoder
    label_dropout=0.0,         # class-conditional, no label dropout (official consistency config)
    stage_interval=100_000,    # ECT stage = 1 + floor(step / 100k) in the official code (7 stages in 700k steps)
    p_mean=-0.4, p_std=1.6,    # Table 9: t ~ lognormal(-0.4, 1.6)
    huber_c=0.06,              # pseudo-Huber constant of the official config
    aux_weight=1.0,            # weight of eq. 9 (0: Table 12a "w/o aux")
    aux_tau=0.1,               # temperature of eq. 9: not stated in the paper; the official code's 0.1
    aux_features="encoder",    # §3.3: W = the pre-trained encoder's LN'd CLS feature, the prediction at t~; official:
                               # projector outputs, both inputs at sigma~_min
    init=None,                 # RCM checkpoint of pretrain.py: encoder init and auxiliary network W of eq. 9 (none:
                               # --from-scratch must be given)
    from_scratch=False,        # random encoder, no pre-training (Table 12a; without --aux-ckpt also no W: "Scratch")
    aux_ckpt=None,             # RCM checkpoint for W of eq. 9 (none: --init; with --from-scratch: Table 12a "w/o RCM")
    init_diffusion=None,       # start f_theta from a train_diffusion.py checkpoint's EMA (ECT's start, not the paper's)
    normalize=None,            # pixel normalisation (none: that of the --init checkpoint; simple from scratch)
    out="runs/cm",             # output directory; a run in it is resumed
    ckpt_every=1000,           # write OUT/ckpt_last.pt every this many steps (and at the end)
    keep_every=50_000,         # also keep OUT/ckpt_<step>.pt every this many steps (0: never)
    log_every=100,             # append a line to OUT/metrics.jsonl every this many steps
    sample_every=50_000,       # write OUT/samples_<step>.png (EMA, one step) every this many steps (0: only at the end)
    sampling={},               # recorded as sample.py's defaults; {"mid_sigma": t} also evaluates two-step sampling
    eval_every=0,              # evaluate (evaluate.Evaluator) every this many steps (0: at the last step only). Cost
                               # (BENCHMARKS.md "Evaluation cost"): 500 one-step EPG-T samples ~9 s on a 2-core CPU
    eval_samples=10_000,       # class-balanced EMA samples per evaluation (0: none)
    eval_ref=None,             # ImageFolder data: ADM reference batch or `fid.py --save-stats` file (FID, sFID, IS,
                               # precision, recall); the embedded data set: its reference classifier
    inception=None,            # Inception weights (none: $EPG_INCEPTION or the torch hub cache; never downloaded)
)
CHOICES = dict(model=tuple(models.MODEL_CONFIGS), lr_schedule=("step", "constant", "cosine"),
               aux_features=("encoder", "projector"), normalize=data.NORMALIZATIONS)
POSITIVE = ("image_size", "batch_size", "steps", "lr", "p_std", "huber_c", "aux_tau", "stage_interval", "ckpt_every",
            "log_every")
NON_NEGATIVE = ("warmup", "weight_decay", "grad_clip", "keep_every", "sample_every", "eval_every", "eval_samples")
FRACTION = ("ema", "dropout", "label_dropout")              # in [0, 1)
# the keys a resumed run may change (paths, cadences, evaluation); every other key must match the checkpoint's
MAY_CHANGE = ("out", "steps", "init", "init_diffusion", "aux_ckpt", "ckpt_every", "keep_every", "log_every",
              "sample_every", "eval_every", "eval_samples", "eval_ref", "inception")
PRESETS = {
    # a 2-core CPU: minutes instead of 156 H200-hours. A constant lr without dropout, and t's proposal centred
    # higher, as for the tiny diffusion model (the shift s = 0.5 halves every level; BENCHMARKS.md, "The tiny
    # presets"); the ECT stage interval stays 100k steps, so a CPU run stays in stage 1 (squeezing the 7
    # stages into a short run made the tiny model worse)
    "T": dict(image_size=32, batch_size=32, steps=1200, lr=5e-4, lr_schedule="constant", lr_milestones=[],
              lr_factors=[], ema=0.995, dropout=0.0, p_mean=1.2, ckpt_every=200, keep_every=0, log_every=25,
              sample_every=0, eval_samples=500),
}


def aux_network(args, rcm, log):
    """The frozen copy W of the pre-trained RCM `rcm` (eq. 9; that of --aux-ckpt, else --init): eval mode, no
    gradient, outside the optimiser and DDP."""
    if args.aux_weight == 0 or rcm is None:
        if args.aux_weight:
            log("note: --from-scratch without --aux-ckpt: no pre-trained W exists, so the auxiliary loss is off")
        return None
    W = models.build_rcm(args.model, args.image_size, proj_dim=rcm["config"].get("proj_dim"))
    try:
        W.load_state_dict(rcm["model"])
    except RuntimeError as e:
        raise rundir.UserError(f"the RCM for W does not fit RCM-{args.model} at {args.image_size}px "
                                 f"({str(e).splitlines()[0]}); pass a matching --init/--aux-ckpt") from None
    log(f"auxiliary network W: RCM-{args.model} (step {rcm['step']}), {args.aux_features} features")
    return W.eval().requires_grad_(False)


def parse_args(argv=None):
    args = trainlib.parse(__file__, CONFIG, PRESETS, argv, CHOICES, positive=POSITIVE, non_negative=NON_NEGATIVE,
                          fraction=FRACTION)
    if len(args.lr_milestones) != len(args.lr_factors):
        raise rundir.UserError(f"--lr-milestones has {len(args.lr_milestones)} values but --lr-factors "
                                 f"{len(args.lr_factors)}; give one factor per milestone")
    if any(m < 0 for m in args.lr_milestones) or any(f < 0 for f in args.lr_factors):
        raise rundir.UserError(f"--lr-milestones and --lr-factors must be >= 0, got "
                               f"{' '.join(map(str, args.lr_milestones))} and {' '.join(map(str, args.lr_factors))}")
    args.lr_milestones = [round(m * args.steps) if m < 1 else int(m) for m in args.lr_milestones]
    if args.lr_milestones != sorted(set(args.lr_milestones)):
        raise rundir.UserError(f"--lr-milestones must increase (in steps), got "
                               f"{' '.join(map(str, args.lr_milestones))}")
    if args.aux_weight < 0:
        raise rundir.UserError(f"--aux-weight must be >= 0, got {args.aux_weight}")
    if args.from_scratch and args.init_diffusion:
        raise rundir.UserError("--from-scratch and --init-diffusion exclude each other (--init-diffusion sets the "
                               "whole network); pass one of them")
    return args


def main(argv=None):
    args = parse_args(argv)
    env = trainlib.init_distributed(args.device)
    device, log = env.device, env.log
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, env.world, args.micro_batch)
    patch_size = rundir.checked(models.patch_size_for, args.model, args.image_size)
    shift = losses.resolution_shift(args.image_size)                              # s = image_size / 64 (Table 9)
    sigma_min = shift * losses.SIGMA_MIN                                          # the shifted boundary of eq. 4

    # ---- data, output directory, resume ----
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)    # clean images + flips (Table 11)
    num_classes = dataset.num_classes
    rundir.prepare_output(args.out, env.main)
    resume = rundir.resume_state(args, "consistency", log)
    rcm = rundir.load_init(args)                                                # also on resume: W of eq. 9
    aux = rundir.load_checkpoint(args.aux_ckpt, "pretrain") if args.aux_ckpt else None
    for source, name in ((resume, "the resumed run"), (rcm, f"--init {args.init}"),
                         (aux, f"--aux-ckpt {args.aux_ckpt}")):            # W sees inputs normalised as in training
        if source is not None:
            rundir.inherit(args, "normalize", source["config"], name)
    args.normalize = args.normalize or "simple"

    # ---- model: f_theta (the RCM's encoder, a fresh decoder), its EMA, the frozen W of eq. 9; optimiser ----
    torch.manual_seed(args.seed)
    model = models.build_epg(args.model, args.image_size, num_classes, args.dropout)
    if rcm is not None:
        rundir.checked(models.load_encoder_from_rcm, model, rcm["model"],
                         context=f"--init {args.init} does not fit EPG-{args.model} at {args.image_size}px: ")
    if args.init_diffusion and resume is None:                # ECT's start: the whole network of a diffusion run
        dm = rundir.load_checkpoint(args.init_diffusion, "diffusion")
        if dm["config"].get("normalize") != args.normalize:
            raise rundir.UserError(f"--init-diffusion {args.init_diffusion} was trained with --normalize "
                                     f"{dm['config'].get('normalize')}, this run uses {args.normalize}; pass "
                                     f"--normalize {dm['config'].get('normalize')} or the diffusion run's --init")
        try:
            model.load_state_dict(dm["ema"])
        except RuntimeError as e:
            raise rundir.UserError(f"--init-diffusion {args.init_diffusion} does not fit EPG-{args.model} at "
                                     f"{args.image_size}px ({str(e).splitlines()[0]})") from None
        log(f"f_theta starts from the diffusion EMA of {args.init_diffusion} (step {dm['step']})")
    W = aux_network(args, aux or rcm, log)
    init_flops = rcm["config"].get("train_flops", 0) * rcm["step"] if rcm else 0   # what the RCM cost (curves.py)
    init_flops = resume["config"].get("init_flops", init_flops) if resume else init_flops
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "consistency", "num_classes": num_classes, "patch_size": patch_size,
              "sigma_min_shifted": sigma_min, "aux_active": W is not None, "data_id": data.identity(dataset),
              "class_counts": data.class_counts(dataset), "code": trainlib.code_fingerprint(__file__),
              "aux_weights": rundir.weights_id(W.state_dict()) if W is not None else None,     # W's identity
              "init_flops": init_flops,
              "train_flops": args.batch_size * models.train_flops_per_image("consistency", args.model, args.image_size)}
    if resume is not None:
        trainlib.check_resume(resume["config"], config, MAY_CHANGE, steps_fixed=args.lr_schedule == "cosine")
    model.to(device)
    W = W.to(device) if W is not None else None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = trainlib.adamw(model, args.lr, args.betas, args.weight_decay, ("pos_embed", "cls_token"), device)
    start = rundir.restore(resume, log, model=model, ema=ema, optimizer=optimizer)
    del resume, rcm, aux
    evaluator = evaluate.Evaluator(args, env, "consistency", num_classes, log, start)   # its inputs checked now
    target = trainlib.compiled(model, args, device)      # the stop-gradient pass: same kernels, same dropout masks
    net = trainlib.ddp(target, env)
    if W is not None:             # W(x_in, c) of eq. 9: LN'd CLS feature (paper) or projector output (official)
        W_fn = trainlib.compiled(W.features if args.aux_features == "encoder" else (lambda x, c: W(x, c)[0]),
                                 args, device)
    rng_devices = [device.index] if device.type == "cuda" else []
    if env.main:
        rundir.write_json(os.path.join(args.out, "config.json"), config)
    log(f"EPG-{args.model}/{patch_size} at {args.image_size}px, {models.count_params(model) / 1e6:.2f}M parameters, "
        f"{data.describe(dataset)}; batch {args.batch_size} = {env.world} x {accum} x {micro}, {args.steps} steps, "
        f"lr {args.lr} ({args.lr_schedule}, warm-up {args.warmup}), EMA {args.ema}, shift s = {shift:g}, {device}; "
        f"dropout {args.dropout}; auxiliary loss "
        + (f"weight {args.aux_weight}, tau {args.aux_tau}, {args.aux_features}" if W is not None else "off"))

    batches = iter(data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="finetune",
                                    mode=args.normalize, start_step=start, num_workers=trainlib.num_workers(args, env),
                                    pin_memory=device.type == "cuda"))
    meter = trainlib.Meter(args, env, ("loss", "loss_consistency", "loss_aux"), start, f"consistency EPG-{args.model}")
    stepper = trainlib.Stepper(optimizer, model, args.skip_nonfinite, log=log)
    ema_net = trainlib.compiled(ema, args, device)                                # the evaluations, compiled too
    evaluator(start, ema_net, meter)             # resumed at an evaluation step that a stop cut short: redo it

    def state():
        return {"stage": "consistency", "config": config, "step": step + 1, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}

    # ---- the loop ----
    mine = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    for step in range(start, args.steps):
        trainlib.seed_step(args.seed, step, env.rank)                             # global RNG: f(seed, step, rank)
        lr_now = trainlib.set_lr(optimizer, trainlib.learning_rate(step, args, args.lr))
        batch = trainlib.to_device(next(batches), device)
        x, y = batch["image"], batch["label"]
        # ECT's (s t, s r) of this stage, eps and label dropout (null class), drawn over the GLOBAL batch (Table 9)
        stage = losses.ect_stage(step, args.stage_interval)
        t, r, eps, y = losses.consistency_draws(trainlib.step_generators(args.seed, step), x, y, mine,
                                                args.batch_size, num_classes, stage, args.p_mean, args.p_std,
                                                args.label_dropout)

        with trainlib.autocast(device):                                           # sg W(x): keys of the whole batch
            keys = losses.aux_keys(W_fn, x, sigma_min) if W is not None else None
        terms = torch.zeros(3, device=device)
        for part, sync in trainlib.micro_batches(net, local_batch, micro):
            with sync:
                with trainlib.autocast(device):
                    cm, prediction = losses.consistency_loss(net, target, x[part], y[part], t[part], r[part],
                                                             eps[part], sigma_min, args.huber_c, rng_devices)
                    aux = (losses.aux_loss(W_fn, prediction, keys, t[part], sigma_min, args.aux_tau,
                                           args.aux_features, first=mine.start + part.start)
                           if W is not None else torch.zeros_like(cm))
                loss = (cm + args.aux_weight * aux).mean()
                (loss / accum).backward()
            terms += torch.stack([loss, cm.mean(), aux.mean()]).detach().float() / accum

        if stepper.step(terms[0], args.grad_clip, step + 1):
            trainlib.ema_update(ema, model, args.ema)
            meter.add(terms)
        meter.log(step + 1, stepper.norm, lr=lr_now, stage=stage)
        rundir.checkpoint(env, args, step + 1, state, save=evaluator.due(step + 1))
        evaluator(step + 1, ema_net, meter)                        # samples, scores, a grid; its own random streams
    meter.close()
    log(f"done: {args.steps} steps, checkpoint {args.out}/ckpt_last.pt")


if __name__ == "__main__":
    rundir.cli_main(main)
