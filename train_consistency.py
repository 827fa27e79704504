"""Consistency fine-tuning of EPG: a one-step generator from a pre-trained RCM encoder (paper §2, §3.3, Table 4).

The pre-trained encoder (projector dropped) plus a fresh decoder form f_theta, parameterised with the boundary
condition of eq. 4 at the shifted sigma~_min = s * 0.002 (s = image_size / 64, Table 9):

    f_theta(x, t~) = c_skip(t~) x + c_out(t~) F_theta(c_in(t~) x, c(t~), y)

Each step draws ECT's continuous time pair (Table 9, "follow ECT"): t ~ lognormal(-0.4, 1.6), r = p(r|t) of the current
stage, shifts both, t~ = s t, r~ = s r, and noises one clean image x with one shared eps (eq. 6):
x_t = x + t~ eps, x_r = x + r~ eps. The loss per image is eq. 5 plus the auxiliary loss of eq. 9:

    lambda(t~, r~) * d( f_theta(x_t, t~), f_sg(theta)(x_r, r~) )  +  w_aux * NT-Xent( W(f_theta(x_t, t~)), sg W(x) )

with lambda = 1/(t~ - r~), d the pseudo-Huber distance S / sg(sqrt(S + 0.06^2)) on the per-image sum of squares S,
the target computed by the current weights (no EMA teacher) in train mode with the same dropout masks, and W a frozen
copy of the pre-trained RCM. Hyper-parameters: Table 11 (AdamW (0.9, 0.99), wd 0.01, step-wise lr 1e-4 / 3e-5 / 8e-6,
no gradient clipping, EMA 0.9999, dropout 0.5 after every decoder attention block, batch 1024, 700k steps).

Examples:
    # CPU, tiny model (EPG-T at 32 px) on the embedded data set, from pretrain.py's RCM-T
    python train_consistency.py --model T --init runs/pt/ckpt_last.pt --out runs/cm
    python sample.py --ckpt runs/cm/ckpt_last.pt --steps 1        # one-step samples
    # 8 GPUs, EPG-L/16 on ImageNet-256 (Table 4)
    torchrun --nproc_per_node=8 train_consistency.py --model L --data DATA/imagenet256 \\
        --init runs/pt-L/ckpt_last.pt --out runs/cm-L
    # the official code's variant of the auxiliary loss and weight decay
    ... --aux-features projector --weight-decay 0.03 --warmup 10000
"""
import contextlib
import copy
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import trainlib

# Every default, with its source. None in a flag means "this CONFIG value, or CONFIG_T for --model T".
CONFIG = dict(
    model="L",                 # EPG-L/16, the consistency model of Table 4 (one-step FID 8.82)
    batch_size=1024,           # Table 11 (the official script uses 256)
    steps=700_000,             # Table 11 / §4 "700K steps (560 epochs)" (official config: 1M)
    lr=1e-4,                   # Table 11: step-wise 1e-4 -> 3e-5 at 400k -> 8e-6 at 500k
    lr_milestones=(400_000, 500_000),
    lr_factors=(0.3, 0.08),
    warmup=0,                  # not in the paper; the official code warms up linearly for 10k steps (--warmup 10000)
    betas=(0.9, 0.99),         # Table 11
    weight_decay=0.01,         # Table 11 (official config 0.03: --weight-decay 0.03); none on pos_embed / cls_token
    ema=0.9999,                # Table 11
    dropout=0.5,               # Table 11 dagger: after each attention block of the decoder, none in the encoder
    stage_interval=100_000,    # ECT stage = 1 + floor(step / 100k) in the official code (7 stages in 700k steps)
    p_mean=-0.4, p_std=1.6,    # Table 9: t ~ lognormal(-0.4, 1.6)
    huber_c=0.06,              # pseudo-Huber constant of the official config
    aux_weight=1.0,            # eq. 9 added with weight 1 (0 = Table 13a "w/o aux")
    aux_tau=0.1,               # temperature of eq. 9: not stated in the paper; the official code uses 0.1
    aux_features="encoder",    # §3.3: W = pre-trained encoder WITHOUT projector (official code: --aux-features projector)
    label_dropout=0.0,         # class-conditional, no label dropout (official consistency config)
    out="runs/cm",
    ckpt_every=1000, keep_every=50_000, log_every=100,
)
# CPU preset for the tiny model: a few minutes on 2 cores instead of 156 H200-hours. The lr milestones keep the
# paper's proportions of the run (4/7 and 5/7 of the steps). The ECT stage interval stays the paper's 100k steps, so
# a CPU run stays in stage 1: squeezing all 7 stages into a short run made the tiny model worse (BENCHMARKS.md).
CONFIG_T = dict(batch_size=32, steps=1200, lr=5e-4, ema=0.995, ckpt_every=200, keep_every=0, log_every=25)
PAPER_PROPORTIONS = dict(lr_milestones=(4 / 7, 5 / 7))


def parse_args(argv=None):
    p = trainlib.common_parser(
        "Consistency fine-tuning of EPG (paper eq. 4, 5, 9; Tables 4, 9, 11). Flags shown with default None take the "
        "paper's value (CONFIG at the top of this file); with --model T the CPU preset "
        f"{', '.join(f'{k}={v}' for k, v in CONFIG_T.items())}, lr milestones at 4/7 and 5/7 of --steps and the "
        "paper's ECT stage interval (100k steps: a CPU run stays in stage 1).", CONFIG)
    p.set_defaults(batch_size=None, steps=None, lr=None, ckpt_every=None, log_every=None, keep_every=None)
    p.add_argument("--init", default=None, help="RCM checkpoint of pretrain.py: encoder init and auxiliary network W")
    p.add_argument("--from-scratch", action="store_true",
                   help="random encoder, no pre-training (Table 6 ablation; unstable, 'NaN' in the paper)")
    p.add_argument("--aux-ckpt", default=None, help="RCM checkpoint for W of eq. 9 (default: --init)")
    p.add_argument("--aux-weight", type=float, default=None, help="weight of the auxiliary loss (eq. 9); 0 disables")
    p.add_argument("--aux-tau", type=trainlib.positive_float, default=None, help="NT-Xent temperature of eq. 9")
    p.add_argument("--aux-features", choices=("encoder", "projector"), default=None,
                   help="encoder: LN'd CLS feature, prediction at t~ and clean image at sigma~_min (paper); "
                        "projector: projector outputs, both at sigma~_min (official code)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                   help="AdamW betas (Table 11: 0.9 0.99)")
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the sampling weights")
    p.add_argument("--dropout", type=float, default=None, help="dropout after each decoder attention block")
    p.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=None,
                   help="steps at which the lr drops (default: 400000 500000; for --model T 4/7 and 5/7 of --steps)")
    p.add_argument("--lr-factors", type=float, nargs="*", default=None,
                   help="lr multipliers from each milestone on (default: 0.3 0.08)")
    p.add_argument("--stage-interval", type=trainlib.positive_int, default=None,
                   help="steps per ECT stage of p(r|t): stage = 1 + floor(step / interval) "
                        "(default 100000, also for --model T)")
    p.add_argument("--p-mean", type=float, default=None, help="mean of ln t of the noise proposal (Table 9: -0.4)")
    p.add_argument("--p-std", type=trainlib.positive_float, default=None,
                   help="std of ln t of the noise proposal (Table 9: 1.6)")
    p.add_argument("--huber-c", type=trainlib.positive_float, default=None, help="pseudo-Huber constant c")
    p.add_argument("--label-dropout", type=float, default=None,
                   help="probability of replacing the class by the null class (default 0: conditional only)")
    p.add_argument("--normalize", choices=data.NORMALIZATIONS, default=None,
                   help="pixel normalisation (default: the one of the RCM checkpoint, else simple)")
    return p.parse_args(argv)


def resolve_defaults(args, log):
    """Fill every unset flag from CONFIG (paper) or, for --model T, from CONFIG_T and the paper's proportions."""
    trainlib.resolve_image_size(args)
    try:
        models.patch_size_for(args.model, args.image_size)
    except ValueError as e:
        raise trainlib.UserError(str(e)) from None
    tiny = args.model == "T"
    used = {}
    for key in ("batch_size", "steps", "lr", "ema", "ckpt_every", "keep_every", "log_every", "weight_decay",
                "dropout", "warmup", "lr_factors", "huber_c", "aux_weight", "aux_tau", "aux_features",
                "label_dropout", "p_mean", "p_std", "betas", "lr_milestones", "stage_interval"):
        if getattr(args, key, None) is not None:
            continue
        if tiny and key in CONFIG_T:
            value = CONFIG_T[key]
        elif tiny and key == "lr_milestones":
            value = tuple(round(f * args.steps) for f in PAPER_PROPORTIONS[key])
        else:
            value = CONFIG[key]
        setattr(args, key, list(value) if isinstance(value, tuple) else value)
        used[key] = getattr(args, key)
    if tiny and used:
        log("--model T preset (flags not given): " + ", ".join(f"{k}={v}" for k, v in used.items()
                                                            if k in CONFIG_T or k in PAPER_PROPORTIONS))
    if len(args.lr_milestones) != len(args.lr_factors):
        raise trainlib.UserError(f"--lr-milestones has {len(args.lr_milestones)} values but --lr-factors "
                                 f"{len(args.lr_factors)}; give one factor per milestone")
    if not 0 <= args.dropout < 1 or not 0 <= args.label_dropout < 1:
        raise trainlib.UserError("--dropout and --label-dropout must be in [0, 1)")
    if not 0 <= args.ema < 1:
        raise trainlib.UserError(f"--ema must be in [0, 1), got {args.ema}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The loss (eq. 4, 5, 9)
# ----------------------------------------------------------------------------------------------------------------
def rng_devices(device):
    """CUDA devices whose RNG state torch.random.fork_rng must fork (the CPU RNG is always forked)."""
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def consistency_loss(f_online, f_target, x_t, t, x_r, r, huber_c=0.06, devices=()):
    """Eq. 5 per image: lambda(t~, r~) * d(f_theta(x_t, t~), f_sg(theta)(x_r, r~)).

    f_online, f_target: callables (x (B, 3, H, W), sigma~ (B,)) -> (B, 3, H, W), e.g. the consistency function of
    the online network and of its stop-gradient copy; any f works (the tests pass the exact solution map).
    x_t, x_r: (B, 3, H, W) points of one trajectory at the shifted levels t, r: (B,), r <= t.
    The target runs first, under no_grad and inside a forked RNG that is rewound afterwards, so the online pass draws
    exactly the same random numbers: identical dropout masks in both passes, as in the official code (which saves
    and restores the CUDA RNG state). `devices`: CUDA devices to fork (rng_devices).
    Returns (loss (B,) fp32, online prediction f_theta(x_t, t~) (B, 3, H, W) with gradient).
    """
    with torch.random.fork_rng(devices=list(devices)), torch.no_grad():
        target = f_target(x_r, r)
    prediction = f_online(x_t, t)
    return losses.ct_weight(t, r) * losses.pseudo_huber(prediction, target, huber_c), prediction


def aux_features(W, x, sigma, kind):
    """W_phi(x, sigma~) of eq. 9 for images x (B, 3, H, W) at shifted levels sigma (B,): the network sees the
    preconditioned input c_in x and c(sigma~) like every EPG network. kind "encoder": LN'd CLS feature (B, D);
    "projector": the projector output (B, P)."""
    x_in = x * losses.c_in(sigma).reshape(-1, 1, 1, 1).to(x.dtype)
    if kind == "encoder":
        return W.features(x_in, losses.c_noise(sigma))
    return W(x_in, losses.c_noise(sigma))[0]


def aux_loss(W, prediction, x0, t, sigma_min, tau, kind="encoder"):
    """Eq. 9: NT-Xent(W(f_theta(x_tn, t_n), t_n), sg W(x_t0, t_0)) per image -> (B,).

    prediction: f_theta(x_t, t~) (B, 3, H, W) with gradient; x0: clean images (B, 3, H, W); t: (B,) shifted levels
    of the noisy inputs; sigma_min: the shifted boundary s * 0.002. Negatives: the clean keys of every other image
    of the global batch.
    Time inputs. Eq. 9 evaluates W on the prediction at t_n, the level of the noisy input it was computed from, and
    on the clean image at t_0; in §2's notation t_0 is the trajectory end sigma_min at which x_t0 counts as data
    (footnote to eq. 4), so the clean key uses sigma~_min. kind "encoder" follows the paper (W without projector,
    prediction at t~); "projector" is the official code (projector outputs, both inputs at sigma~_min).
    W is frozen: its parameters get no gradient, but the gradient flows through it into the prediction.
    """
    at_min = torch.full_like(t, sigma_min)
    query = aux_features(W, prediction, t if kind == "encoder" else at_min, kind)
    with torch.no_grad():
        key = aux_features(W, x0, at_min, kind)
    return losses.nt_xent(query, key, tau)


# ----------------------------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------------------------
def step_lr(step, base_lr, milestones, factors, warmup=0):
    """Table 11: base_lr until the first milestone, then base_lr * factor of the last milestone passed; optional
    linear warm-up from 0 over `warmup` steps (official code: 10k)."""
    lr = base_lr
    for milestone, factor in zip(milestones, factors):
        if step >= milestone:
            lr = base_lr * factor
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def load_aux_network(args, image_size, log):
    """The frozen copy W of the pre-trained RCM (eq. 9): eval mode, requires_grad False, outside the optimiser and
    outside DDP. None when the auxiliary loss is off."""
    if args.aux_weight == 0:
        return None
    path = args.aux_ckpt or args.init
    if path is None:
        log("note: --from-scratch without --aux-ckpt: no pre-trained network W exists, so the auxiliary loss "
            "(eq. 9) is off")
        return None
    state = trainlib.load_checkpoint(path, stage="pretrain")
    cfg = state["config"]
    if cfg.get("model") != args.model or cfg.get("image_size") != image_size:
        raise trainlib.UserError(f"--aux-ckpt {path} holds RCM-{cfg.get('model')} at {cfg.get('image_size')}px, "
                                 f"but EPG-{args.model} at {image_size}px is trained; pass a matching checkpoint")
    proj_dim = state["model"]["projector.6.weight"].shape[0] if "projector.6.weight" in state["model"] else None
    W = models.build_rcm(args.model, image_size, proj_dim=proj_dim)
    try:
        W.load_state_dict(state["model"])
    except RuntimeError as e:
        raise trainlib.UserError(f"--aux-ckpt {path} does not fit RCM-{args.model}: {str(e).splitlines()[0]}") from None
    W.eval().requires_grad_(False)
    log(f"auxiliary network W: RCM-{args.model} from {path} (step {state['step']}), {args.aux_features} features")
    return W


def init_normalization(args):
    """The pixel normalisation must be the one the encoder was pre-trained with."""
    saved = None
    if args.init:
        saved = trainlib.load_checkpoint(args.init, stage="pretrain")["config"].get("normalize")
    if args.normalize is None:
        args.normalize = saved or "simple"
    elif saved and saved != args.normalize:
        raise trainlib.UserError(f"--normalize {args.normalize} differs from the RCM checkpoint's '{saved}'; "
                                 f"drop --normalize or pass --normalize {saved}")
    return args.normalize


def all_finite(module):
    return bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())


# Settings that define a run: resuming with other values is refused.
RESUME_KEYS = ("model", "image_size", "batch_size", "data", "seed", "normalize", "from_scratch", "dropout",
               "aux_weight", "aux_features", "aux_tau", "stage_interval", "huber_c", "p_mean", "p_std",
               "label_dropout", "lr", "lr_milestones", "lr_factors", "warmup", "weight_decay", "ema")


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    dist_info = trainlib.init_distributed(args.device)
    device, is_main = dist_info.device, dist_info.is_main
    log = print if is_main else (lambda *a, **k: None)
    resolve_defaults(args, log)
    trainlib.check_output_dir(args.out)
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, dist_info.world, args.micro_batch)
    init_normalization(args)

    # data: clean images with horizontal flips (Table 11)
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)
    num_classes = dataset.num_classes

    # networks: f_theta (encoder from the RCM, fresh decoder), its EMA, and the frozen W of eq. 9
    raw = trainlib.build_finetune_model(args, num_classes, decoder_dropout=args.dropout, log=log).to(device)
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    W = load_aux_network(args, args.image_size, log)
    W = W.to(device) if W is not None else None
    optimizer = trainlib.adamw(raw, args.lr, tuple(args.betas), args.weight_decay,
                               no_decay=("pos_embed", "cls_token"), device=device)

    config = {k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")}
    config.update(num_classes=num_classes, patch_size=raw.patch_size,
                  sigma_min_shifted=losses.SIGMA_MIN * losses.resolution_shift(args.image_size),
                  aux_active=W is not None)
    log(f"EPG-{args.model} at {args.image_size}px, noise shift s = {losses.resolution_shift(args.image_size)}, "
        f"{dist_info.world} process(es), device {device}, global batch {args.batch_size} = {dist_info.world} x "
        f"{accum} x {micro}\nlr {args.lr} (x {args.lr_factors} from steps {args.lr_milestones}, warm-up "
        f"{args.warmup}), betas {tuple(args.betas)}, weight decay {args.weight_decay}, EMA {args.ema}, dropout "
        f"{args.dropout}, ECT stage every {args.stage_interval} steps, {args.steps} steps; auxiliary loss "
        + (f"weight {args.aux_weight}, tau {args.aux_tau}, {args.aux_features} features" if W is not None else "off"))

    # resume
    step = 0
    last = os.path.join(args.out, "ckpt_last.pt")
    if os.path.exists(last):
        state = trainlib.load_checkpoint(last, stage="consistency")
        trainlib.check_resume_compatible(state["config"], config, RESUME_KEYS)
        raw.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        log(f"resumed from {last} at step {step}")
    if is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)

    compiled = trainlib.maybe_compile(raw, args, device)
    model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) if dist_info.enabled \
        else compiled
    # The stop-gradient target pass: the same (compiled) network without the DDP wrapper, so that it runs the same
    # kernels, and hence draws the same dropout masks, as the online pass.
    target_net = compiled

    stream = data.BatchStream(dataset, args.batch_size, dist_info.rank, dist_info.world, args.seed,
                              views="finetune", mode=args.normalize, start_step=step,
                              num_workers=args.num_workers if args.num_workers is not None else
                              (8 if device.type == "cuda" else 0), pin_memory=device.type == "cuda")
    scale = losses.resolution_shift(args.image_size)
    sigma_min = losses.SIGMA_MIN * scale                     # the shifted boundary of eq. 4
    devices = rng_devices(device)
    metrics = trainlib.MetricsLog(os.path.join(args.out, "metrics.jsonl"), enabled=is_main)
    speed = trainlib.Throughput(device)
    bar = trainlib.progress(args.steps, step, is_main, "consistency")
    sums = torch.zeros(3, device=device)                     # consistency, aux, total since the last log point
    sums_count = 0
    last_logged = float("nan")
    t0 = time.perf_counter()

    raw.train()
    batches = iter(stream)
    while step < args.steps:
        # the batch first: the first next() creates a DataLoader iterator, which draws from the global RNG
        batch = next(batches)
        trainlib.seed_step(args.seed, step, dist_info.rank)     # dropout masks: a function of (seed, step, rank)
        trainlib.set_lr(optimizer, step_lr(step, args.lr, args.lr_milestones, args.lr_factors, args.warmup))
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)

        # time pairs (unshifted, Table 9), shared noise and label dropout for the GLOBAL batch; slice this rank's part
        stage = losses.ect_stage(step, args.stage_interval)
        t, r = losses.ct_time_pair(args.batch_size, stage, trainlib.step_generator(args.seed, step, "cpu", 0),
                                   args.p_mean, args.p_std)
        eps = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device,
                          generator=trainlib.step_generator(args.seed, step, device, 1))
        drop = torch.rand(args.batch_size, generator=trainlib.step_generator(args.seed, step, "cpu", 2))
        lo = dist_info.rank * local_batch
        t, r = (scale * t[lo:lo + local_batch]).to(device), (scale * r[lo:lo + local_batch]).to(device)
        eps, drop = eps[lo:lo + local_batch], drop[lo:lo + local_batch].to(device)
        labels = torch.where(drop < args.label_dropout, torch.full_like(labels, num_classes), labels)

        step_terms = torch.zeros(3, device=device)          # consistency, aux, total of this step
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            x0, y, t_m, r_m, eps_m = images[part], labels[part], t[part], r[part], eps[part]
            x_t, x_r = x0 + t_m.view(-1, 1, 1, 1) * eps_m, x0 + r_m.view(-1, 1, 1, 1) * eps_m     # eq. 6
            sync = contextlib.nullcontext() if (m == accum - 1 or not dist_info.enabled) else model.no_sync()
            with sync:
                with trainlib.autocast(device):
                    f_online = lambda x, s: losses.consistency_function(model, x, s, y, sigma_min)      # noqa: E731
                    f_target = lambda x, s: losses.consistency_function(target_net, x, s, y, sigma_min)  # noqa: E731
                    cm, prediction = consistency_loss(f_online, f_target, x_t, t_m, x_r, r_m, args.huber_c, devices)
                    aux = (aux_loss(W, prediction, x0, t_m, sigma_min, args.aux_tau, args.aux_features)
                           if W is not None else torch.zeros_like(cm))
                    loss = (cm + args.aux_weight * aux).mean()   # per image: lambda d + w_aux NT-Xent; batch mean
                (loss / accum).backward()
            step_terms += torch.stack([cm.mean(), aux.mean(), loss]).detach().float() / accum

        norm = trainlib.grad_norm(raw) if ((step + 1) % args.log_every == 0 or step + 1 == args.steps) else None
        skipped = args.skip_nonfinite and not (torch.isfinite(trainlib.all_reduce_mean(step_terms.clone())).all()
                                               & torch.isfinite(trainlib.grad_norm(raw))).item()
        if skipped:     # the weights stay as they are; logging and checkpoints go on as usual
            log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
            optimizer.zero_grad(set_to_none=True)
        else:
            sums += step_terms
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trainlib.ema_update(ema, raw, args.ema)
            sums_count += 1
        step += 1
        speed.add(args.batch_size)
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            mean = trainlib.all_reduce_mean(sums / max(sums_count, 1)).tolist()   # the one host sync of a log point
            last_logged = mean[2]
            trainlib.check_finite(last_logged, step)
            record = dict(step=step, loss=mean[2], loss_consistency=mean[0], loss_aux=mean[1], stage=stage,
                          lr=optimizer.param_groups[0]["lr"],
                          grad_norm=float(norm) if norm is not None else None,
                          images_per_s=speed.rate(), peak_memory_gb=trainlib.peak_memory_gb(device),
                          elapsed_s=time.perf_counter() - t0)
            metrics.write(**record)
            bar.set_postfix(loss=f"{mean[2]:.4f}", cm=f"{mean[0]:.4f}", aux=f"{mean[1]:.3f}", stage=stage)
            sums.zero_()
            sums_count = 0
        if is_main and (step % args.ckpt_every == 0 or step == args.steps
                        or (args.keep_every and step % args.keep_every == 0)):
            if not (all_finite(raw) and (skipped or torch.isfinite(step_terms).all().item())):
                raise trainlib.NonFiniteLoss(f"weights or loss became non-finite at step {step}; the last good "
                                             f"checkpoint was kept. Lower --lr or pass --skip-nonfinite")
            state = {"stage": "consistency", "config": config, "step": step, "model": raw.state_dict(),
                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
            if step % args.ckpt_every == 0 or step == args.steps:
                trainlib.save_checkpoint(last, state)
            if args.keep_every and step % args.keep_every == 0:
                trainlib.save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), state)
    bar.close()
    log(f"done: {step} steps, last logged loss {last_logged:.4f}, {time.perf_counter() - t0:.0f} s; "
        f"checkpoint {last}")


if __name__ == "__main__":
    trainlib.cli_main(main)
