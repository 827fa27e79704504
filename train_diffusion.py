"""Diffusion fine-tuning of EPG (paper §3.3 "Diffusion model", eq. 1, Tables 9 and 11; the main results, Tables 1-3).

The pre-trained RCM encoder (projector discarded) and a fresh adaLN-Zero decoder are trained end to end as an
x-prediction denoiser (losses.diffusion_loss):

    t_n ~ lognormal(-1.2, 1.6) snapped to the N = 1280 Karras grid        (Table 9, dagger; unshifted)
    x_t = x + s t_n eps,  s = image_size / 64                              (Table 9, resolution shift)
    D = F(c_in(s t_n) x_t, c(s t_n), y),  y -> null class w.p. 0.1        (x-prediction; CFG label dropout)
    L = E[ 1/(t_n - t_{n-1}) * mean_pixels (D - x)^2 ]                     (eq. 1 with Table 9's weighting)

Optimiser settings: CONFIG (Table 11). The checkpoint holds the online and EMA weights; sample.py uses the EMA.

    python train_diffusion.py --model T --init runs/pt/ckpt_last.pt --out runs/dm                # CPU, minutes
    torchrun --nproc_per_node=8 train_diffusion.py --model XL --data /data/imagenet256 \\
        --init runs/rcm_b/ckpt_last.pt --out runs/dm_xl                                           # Table 1
    ... --lr-schedule cosine --warmup 10000                                                       # the official run
    ... --freeze-encoder | --lrd 0.5 | --from-scratch                                             # Table 13, Table 6
Rerunning the same command after an interruption resumes from OUT/ckpt_last.pt.
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
    model="XL",                # EPG-XL/16, the official ImageNet-256 script (Table 1)
    image_size=256,            # image side in pixels (Table 7: 256; EPG-L/32 at 512)
    batch_size=1024,           # Table 11 (global)
    steps=1_000_000,           # Table 11 / §4: 1M steps (800 epochs); EPG-G 2M (PRESETS)
    lr=1e-4,                   # Table 11
    lr_schedule="constant",    # Table 11 states no schedule; official code: cosine (with --warmup 10000)
    warmup=0,                  # linear lr warm-up steps from 0 (official code: 10000)
    cooldown=0,                # linear lr decay to 0 over the last this many steps (0: none; not in the paper; make
                               # demo: 1000 of 6000 score as 7000 steps at a constant lr, BENCHMARKS.md "make demo")
    weight_decay=0.01,         # Table 11; no decay on pos_embed and cls_token (official parameter groups)
    betas=[0.9, 0.999],        # Table 11
    grad_clip=0.5,             # Table 11 (0: off); the official code clips only after its warm-up
    ema=0.9999,                # Table 11, every step from step 0 (official)
    label_dropout=0.1,         # not stated in the paper; the official code's rate (null class = num_classes)
    p_mean=-1.2, p_std=1.6,    # Table 9: lognormal(-1.2, 1.6) noise proposal, snapped to the N = 1280 grid
    init=None,                 # RCM checkpoint of pretrain.py whose encoder initialises EPG (none: --from-scratch
                               # must be given)
    from_scratch=False,        # random encoder instead of --init (Table 6 and 13 "scratch")
    freeze_encoder=False,      # Table 13 "Frozen": the encoder is not updated, only the decoder (and class embedding)
    lrd=1.0,                   # Table 13 "Lrd=0.5": layer-wise lr decay of the encoder (1: off; see layer_decay)
    normalize=None,            # pixel normalisation (none: that of the --init checkpoint; simple from scratch)
    out="runs/dm",             # output directory; a run in it is resumed
    ckpt_every=5000,           # write OUT/ckpt_last.pt every this many steps (and at the end)
    keep_every=100_000,        # also keep OUT/ckpt_<step>.pt every this many steps (0: never)
    log_every=100,             # append a line to OUT/metrics.jsonl every this many steps
    sample_every=5000,         # write OUT/samples_<step>.png (EMA, Heun) every this many steps (0: only at the end)
    sample_steps=16,           # Heun steps of the grids and the evaluations
    sampling={},               # guidance of the grids and evaluations, recorded as sample.py's defaults (empty: the
                               # paper's, §4)
    eval_every=0,              # evaluate (evaluate.Evaluator) every this many steps (0: at the last step only). Cost
                               # (BENCHMARKS.md "Evaluation cost"): 500 EPG-T samples ~2 min on a 2-core CPU (Heun-16
                               # with the preset's guidance); 10k EPG-XL samples (Heun-16) ~4 H100-minutes, estimated
    eval_samples=10_000,       # class-balanced EMA samples per evaluation (§4's ablations: FID on 10k; 0: none)
    eval_cfg=[],               # guidance scales to evaluate, each from the same noise (none: the run's `sampling`)
    eval_cfg_interval=[],      # LO HI: unshifted sigma interval of --eval-cfg's guidance (none: the run's)
    eval_ref=None,             # ImageFolder data: ADM reference batch or `fid.py --save-stats` file (FID, sFID, IS,
                               # precision, recall); the embedded data set: its reference classifier
    inception=None,            # Inception weights (none: $EPG_INCEPTION or the torch hub cache; never downloaded)
)
CHOICES = dict(model=tuple(models.MODEL_CONFIGS), lr_schedule=("constant", "cosine"), normalize=data.NORMALIZATIONS)
POSITIVE = ("image_size", "batch_size", "steps", "lr", "p_std", "ckpt_every", "log_every", "sample_steps")
NON_NEGATIVE = ("warmup", "cooldown", "weight_decay", "grad_clip", "keep_every", "sample_every", "eval_every",
                "eval_samples")
FRACTION = ("ema", "label_dropout")                         # in [0, 1); --lrd in (0, 1]: parse_args
# the keys a resumed run may change (paths, cadences, evaluation); every other key must match the checkpoint's
MAY_CHANGE = ("out", "steps", "init", "ckpt_every", "keep_every", "log_every", "sample_every", "sample_steps",
              "eval_every", "eval_samples", "eval_cfg", "eval_cfg_interval", "eval_ref", "inception")
PRESETS = {
    # a 2-core CPU: a short, larger-lr run with a faster EMA and small batches (batch 8 learns more per image than
    # 32 or 16 at this size). At 32^2 the shift s = 0.5 halves every level, and with Table 9's proposal a tiny run
    # almost never trains where the sampler lays out the image: the proposal is centred higher (BENCHMARKS.md,
    # "The tiny presets")
    "T": dict(image_size=32, batch_size=8, steps=7000, lr=1e-3, ema=0.995, ckpt_every=1000, keep_every=0,
              log_every=100, sample_every=2000, eval_samples=500, p_mean=0.4,
              # recorded in the checkpoint as sample.py's defaults: at 32^2 the paper's interval guides only
              # sigma~ <= 0.8, where the layout is already fixed; guiding the levels above it gives the best class
              # accuracy and FD_ref together (BENCHMARKS.md, "Guidance of the tiny diffusion model")
              sampling=dict(cfg_scale=4.0, cfg_interval=[1.61, 80.0])),
    "G": dict(steps=2_000_000),     # Table 11: EPG-G's headline FIDs after 2M steps (1600 epochs)
}


def layer_decay(name, depth, decay):
    """Table 13 "Lrd": the lr multiplier of parameter `name`, BEiT/MAE's layer-wise decay over the encoder: patch
    embedding, [CLS] and positional embedding decay^(depth + 1), encoder block i decay^(depth - i) (the last block
    decay^1), everything else (the encoder's final norm, the decoder, the class embedding) 1."""
    if name.startswith("encoder.blocks."):
        return decay ** (depth - int(name.split(".")[2]))
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return decay ** (depth + 1)
    return 1.0


def parse_args(argv=None):
    args = trainlib.parse(__file__, CONFIG, PRESETS, argv, CHOICES, positive=POSITIVE, non_negative=NON_NEGATIVE,
                          fraction=FRACTION)
    if not 0 < args.lrd <= 1:
        raise rundir.UserError(f"--lrd must be in (0, 1] (1: no decay, Table 13: 0.5), got {args.lrd}; "
                               f"--freeze-encoder keeps the encoder fixed")
    if args.freeze_encoder and args.lrd != 1:
        raise rundir.UserError(f"--freeze-encoder trains no encoder layer, so --lrd {args.lrd} would do nothing; drop "
                               f"one of them")
    if len(args.eval_cfg_interval) not in (0, 2) or args.eval_cfg_interval[:1] >= args.eval_cfg_interval[1:] != []:
        raise rundir.UserError(f"--eval-cfg-interval takes LO HI with LO < HI, got {args.eval_cfg_interval}")
    return args


def main(argv=None):
    args = parse_args(argv)
    env = trainlib.init_distributed(args.device)
    device, log = env.device, env.log
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, env.world, args.micro_batch)
    patch_size = rundir.checked(models.patch_size_for, args.model, args.image_size)
    shift = losses.resolution_shift(args.image_size)                              # s = image_size / 64 (Table 9)

    # ---- data, output directory, resume ----
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)
    num_classes = dataset.num_classes
    rundir.prepare_output(args.out, env.main)
    resume = rundir.resume_state(args, "diffusion", log)
    rcm = rundir.load_init(args) if resume is None else None
    rundir.inherit(args, "normalize", (resume or rcm or {"config": {}})["config"], "--init or the resumed run")
    args.normalize = args.normalize or "simple"
    init_flops = rcm["config"].get("train_flops", 0) * rcm["step"] if rcm else 0   # what the RCM cost (curves.py)
    init_flops = resume["config"].get("init_flops", init_flops) if resume else init_flops
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "diffusion", "num_classes": num_classes, "patch_size": patch_size, "shift": shift,
              "data_id": data.identity(dataset), "class_counts": data.class_counts(dataset),
              "code": trainlib.code_fingerprint(__file__), "init_flops": init_flops,
              "train_flops": args.batch_size * models.train_flops_per_image("diffusion", args.model, args.image_size)}
    if resume is not None:
        trainlib.check_resume(resume["config"], config, MAY_CHANGE,
                              steps_fixed=args.lr_schedule == "cosine" or args.cooldown > 0)    # where the lr ends

    # ---- model: the RCM's encoder (projector dropped, §3.3) and a fresh decoder; EMA; optimiser ----
    torch.manual_seed(args.seed)
    model = models.build_epg(args.model, args.image_size, num_classes)
    if rcm is not None:
        rundir.checked(models.load_encoder_from_rcm, model, rcm["model"],
                         context=f"--init {args.init} does not fit EPG-{args.model} at {args.image_size}px: ")
    model.encoder.requires_grad_(not args.freeze_encoder)
    model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    depth = models.model_config(args.model)["depth"]
    optimizer = trainlib.adamw(model, args.lr, args.betas, args.weight_decay, ("pos_embed", "cls_token"), device,
                               lr_scale=lambda name: layer_decay(name, depth, args.lrd))
    start = rundir.restore(resume, log, model=model, ema=ema, optimizer=optimizer)
    del resume, rcm
    evaluator = evaluate.Evaluator(args, env, "diffusion", num_classes, log, start)   # its inputs checked now
    net = trainlib.ddp(trainlib.compiled(model, args, device), env)
    ema_net = trainlib.compiled(ema, args, device)                                # the evaluations, compiled too
    if env.main:
        rundir.write_json(os.path.join(args.out, "config.json"), config)
    log(f"EPG-{args.model}/{patch_size} at {args.image_size}px, {models.count_params(model) / 1e6:.2f}M parameters, "
        f"{data.describe(dataset)}; batch {args.batch_size} = {env.world} x {accum} x {micro}, {args.steps} steps, "
        f"lr {args.lr} ({args.lr_schedule}, warm-up {args.warmup}, cool-down {args.cooldown}), EMA {args.ema}, "
        f"shift s = {shift:g}, {device}"
        + (", encoder frozen" if args.freeze_encoder else f", encoder lr decay {args.lrd}" if args.lrd != 1 else ""))

    batches = iter(data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="finetune",
                                    mode=args.normalize, start_step=start, num_workers=trainlib.num_workers(args, env),
                                    pin_memory=device.type == "cuda"))
    meter = trainlib.Meter(args, env, ("loss",), start, f"diffusion EPG-{args.model}")
    stepper = trainlib.Stepper(optimizer, model, args.skip_nonfinite, log=log)
    evaluator(start, ema_net, meter)             # resumed at an evaluation step that a stop cut short: redo it

    def state():
        return {"stage": "diffusion", "config": config, "step": step + 1, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}

    # ---- the loop ----
    mine = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    for step in range(start, args.steps):
        trainlib.seed_step(args.seed, step, env.rank)                             # global RNG: f(seed, step, rank)
        lr_now = trainlib.set_lr(optimizer, trainlib.learning_rate(step, args, args.lr))
        batch = trainlib.to_device(next(batches), device)
        x, y = batch["image"], batch["label"]
        # s t_n, its weight, eps and label dropout (null class for CFG), drawn over the GLOBAL batch (Table 9)
        sigma, weight, eps, y = losses.diffusion_draws(trainlib.step_generators(args.seed, step), x, y, mine,
                                                       args.batch_size, num_classes, args.p_mean, args.p_std,
                                                       args.label_dropout)

        terms = torch.zeros(1, device=device)
        for part, sync in trainlib.micro_batches(net, local_batch, micro):
            with sync:
                with trainlib.autocast(device):
                    loss = losses.diffusion_loss(net, x[part], y[part], sigma[part], weight[part], eps[part]).mean()
                (loss / accum).backward()
            terms += torch.stack([loss]).detach().float() / accum

        if stepper.step(terms[0], args.grad_clip, step + 1):
            trainlib.ema_update(ema, model, args.ema)
            meter.add(terms)
        meter.log(step + 1, stepper.norm, lr=lr_now)
        rundir.checkpoint(env, args, step + 1, state, save=evaluator.due(step + 1))
        evaluator(step + 1, ema_net, meter)                        # samples, scores, a grid; its own random streams
    meter.close()

    log(f"done: {args.steps} steps, checkpoint {args.out}/ckpt_last.pt")


if __name__ == "__main__":
    rundir.cli_main(main)
