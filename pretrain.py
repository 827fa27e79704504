"""Stage 1 of EPG: pre-training the Representation Consistency Model (RCM) by self-supervision (paper §3.2, eq. 6-8).

The RCM is the ViT encoder E plus a 3-layer projector L (Table 8). Every step draws, per image x, two MoCo v3 views
y1, y2, one Gaussian noise eps shared by all its inputs and an adjacent pair t_n > t_{n-1} of the Karras grid with N(k)
points (iCT curriculum 20 -> 1280, Table 9), and minimises eq. 8 (losses.rcm_loss):

    NT-Xent(L(E(y1~)), sg L-(E-(y2~))) + NT-Xent(L(E(y2~)), sg L-(E-(y1~)))  +  NT-Xent(E(x_{t_n}), sg E(x_{t_{n-1}}))

with y~ = y + s sigma_min eps, E-/L- the momentum copy (EMA 0.99) and sg E the online encoder under stop-gradient.
Noise levels are multiplied by s = image_size / 64 (Table 9). A kNN probe of the online encoder's clean [CLS] feature
measures what was learnt. The checkpoint OUT/ckpt_last.pt holds {"stage": "pretrain", "config", "step", "model",
"momentum", "optimizer"}; the fine-tuning scripts take it as --init.

    python pretrain.py --model T --out runs/pt                                       # CPU, embedded data, minutes
    torchrun --nproc_per_node=8 pretrain.py --model B --data /data/imagenet256 --out runs/rcm_b
    ... --shared-noise-index --betas 0.9 0.95 --warmup 10000 --tau-schedule constant --proj-dim 768 \\
        --curriculum official --normalize imagenet                                # the official code's settings
    ... --rc-weight 0 | --ctr-weight 0 | --tau2 0.5 | --tau2 0.1                   # Tables 12b/12c (README)
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import evaluate
import losses
import models
import rundir
import trainlib

# ----------------------------------------------------------------------------------------------------------------
# Defaults: the paper's Table 10 (pre-training) and Table 9 for RCM-S/B/L; --model T applies PRESETS["T"]
# ----------------------------------------------------------------------------------------------------------------
CONFIG = dict(
    model="B",                 # RCM-B/16, the paper's ablation model and its released encoder
    image_size=256,            # image side in pixels (Table 7: 256; EPG-L/32 at 512)
    batch_size=1024,           # Table 10 (global)
    steps=600_000,             # Table 10
    lr=6e-4,                   # Table 10, at batch 1024; scaled by batch_size / 1024 (B.2). Official config: 2e-4
    lr_schedule="cosine",      # Table 10: cosine decay to 0
    warmup=0,                  # the paper states cosine decay only; official code: 10k steps linear from 0
    weight_decay=0.03,         # Table 10 for RCM-S/B; RCM-L 0.05 (PRESETS)
    betas=[0.9, 0.999],        # Table 10 / B.2 "default betas"; official code 0.9 0.95
    grad_clip=0.0,             # gradient-norm clip (0: off, as the paper and the official code)
    momentum=0.99,             # EMA of the momentum encoder (Table 10), constant
    ctr_tau=0.2,               # temperature of the contrastive term (Table 10)
    tau1=0.1, tau2=0.2,        # tau(t) = tau1 (1 - t) + tau2 t of the consistency term (§3.2, Table 10;
                               # Table 12b: tau2 0.1, 0.5)
    tau_schedule="annealed",   # tau2 annealed to tau1 (paper); interpolated: tau2 kept; constant: tau1 (official
                               # config)
    ctr_weight=1.0,            # weight of the contrastive term of eq. 8 (0: Table 12c "w/o contrast")
    rc_weight=1.0,             # weight of the representation-consistency term (0: Table 12b/c "w/o consistency")
    scales_start=20, scales_end=1280,  # discretisation steps N from 20 to 1280 (Table 9)
    curriculum="ict",          # N(k) of iCT (paper); official: the official code's ceil variant
    shared_noise_index=False,  # one noise index n for the whole global batch (official code) instead of one per image
    proj_dim=0,                # projector output width (0: the model's, 256; 128 for T; official launch script 768)
    normalize="simple",        # pixels -> [-1, 1]; official code: imagenet ((x - mean) / (2 std))
    out="runs/pretrain",       # output directory; a run in it is resumed
    ckpt_every=10_000,         # write OUT/ckpt_last.pt every this many steps (and at the end)
    keep_every=50_000,         # also keep OUT/ckpt_<step>.pt every this many steps (0: never)
    log_every=100,             # append a line to OUT/metrics.jsonl every this many steps
    probe_every=10_000,        # kNN probe every this many steps, plus step 0 and the end (0: off)
    probe_bank=2000,           # train images in the kNN memory bank
    probe_queries=1000,        # images the kNN probe classifies (held-out split, else train images outside the bank)
)
CHOICES = dict(model=tuple(models.MODEL_CONFIGS), lr_schedule=("cosine", "constant"),
               tau_schedule=("annealed", "interpolated", "constant"), curriculum=("ict", "official"),
               normalize=data.NORMALIZATIONS)
POSITIVE = ("image_size", "batch_size", "steps", "lr", "ctr_tau", "tau1", "tau2", "scales_start", "scales_end",
            "ckpt_every", "log_every", "probe_bank", "probe_queries")
NON_NEGATIVE = ("warmup", "weight_decay", "grad_clip", "proj_dim", "keep_every", "probe_every")
FRACTION = ("momentum",)       # in [0, 1)
# the keys a resumed run may change (paths, cadences); every other key must match the checkpoint's
MAY_CHANGE = ("out", "steps", "ckpt_every", "keep_every", "log_every", "probe_every", "probe_bank", "probe_queries")
BASE_BATCH = 1024              # the batch size at which lr is given
PRESETS = {
    # a 2-core CPU: minutes instead of months, while the probe accuracy clearly rises (BENCHMARKS.md)
    "T": dict(image_size=32, batch_size=32, steps=300, lr=3.2e-2, ckpt_every=100, keep_every=0, log_every=10,
              probe_every=100),
    "L": dict(weight_decay=0.05),   # Table 10, RCM-L
}


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient of every rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch of all processes for CPU (gloo) process groups, where nn.SyncBatchNorm
    cannot run; gradients flow through the differentiable all-reduce, as in SyncBatchNorm."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        count = _AllReduceSum.apply(x.new_full((1,), float(x.shape[0])))
        mean = _AllReduceSum.apply(x.sum(dim=0)) / count
        var = _AllReduceSum.apply((x - mean).pow(2).sum(dim=0)) / count                   # biased, as BatchNorm
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def sync_batchnorm(module, env):
    """BatchNorm with global-batch statistics under DDP (nn.SyncBatchNorm on GPU, GlobalBatchNorm1d on CPU)."""
    if not env.distributed:
        return module
    if env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            bn = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, env)
    return module



def parse_args(argv=None):
    args = trainlib.parse(__file__, CONFIG, PRESETS, argv, CHOICES, positive=POSITIVE, non_negative=NON_NEGATIVE,
                          fraction=FRACTION)
    if min(args.ctr_weight, args.rc_weight) < 0 or args.ctr_weight == args.rc_weight == 0:
        raise rundir.UserError(f"--ctr-weight and --rc-weight must be >= 0 and not both 0, got {args.ctr_weight} and "
                               f"{args.rc_weight}")
    if not 1 <= args.scales_start <= args.scales_end:
        raise rundir.UserError(f"--scales-start and --scales-end need 1 <= start <= end, got {args.scales_start} and "
                               f"{args.scales_end}")
    if min(args.batch_size, args.micro_batch or args.batch_size) < 2:
        raise rundir.UserError("BatchNorm (the projector's) needs at least 2 images per forward: use --batch-size and "
                               "--micro-batch >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    env = trainlib.init_distributed(args.device)
    device, log = env.device, env.log
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, env.world, args.micro_batch)
    if micro < 2:
        raise rundir.UserError(f"BatchNorm (the projector's) needs at least 2 images per forward, but each of the "
                               f"{env.world} processes gets {micro}; use a larger --batch-size or --micro-batch")
    patch_size = rundir.checked(models.patch_size_for, args.model, args.image_size)
    lr = args.lr * args.batch_size / BASE_BATCH                                   # linear scaling rule (B.2)
    shift = losses.resolution_shift(args.image_size)                              # s = image_size / 64 (Table 9)
    sigma_views = shift * losses.SIGMA_MIN                                        # the views sit at s * sigma_min

    # ---- data, output directory, resume ----
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "pretrain", "proj_dim": args.proj_dim or models.model_config(args.model)["proj_dim"],
              "patch_size": patch_size, "lr_scaled": lr, "num_classes": dataset.num_classes,
              "data_id": data.identity(dataset), "resolution_shift": shift, "code": trainlib.code_fingerprint(__file__),
              "train_flops": args.batch_size * models.train_flops_per_image("pretrain", args.model, args.image_size)}
    rundir.prepare_output(args.out, env.main)
    resume = rundir.resume_state(args, "pretrain", log)
    if resume is not None:
        trainlib.check_resume(resume["config"], config, MAY_CHANGE, steps_fixed=True)  # cosine, curriculum, tau(k)

    # ---- model, momentum copy, optimiser ----
    torch.manual_seed(args.seed)
    rcm = models.build_rcm(args.model, args.image_size, config["proj_dim"])
    momentum = copy.deepcopy(rcm).requires_grad_(False)
    rcm, momentum = sync_batchnorm(rcm, env), sync_batchnorm(momentum, env)  # global-batch BN
    # MoCo v3 keeps the momentum branch in train mode (batch statistics in its projector BN). The official code puts
    # it in eval mode, where its never-updated running statistics stay 0/1: a bug we do not copy.
    momentum.train()
    rcm.to(device)
    momentum.to(device)
    optimizer = trainlib.adamw(rcm, lr, args.betas, args.weight_decay, device=device)        # all decayed
    start = rundir.restore(resume, log, model=rcm, momentum=momentum, optimizer=optimizer)
    del resume
    net = trainlib.ddp(trainlib.compiled(models.RCMViews(rcm, with_rest=True), args, device), env)
    momentum_fn = trainlib.compiled(models.RCMViews(momentum), args, device)
    target_fn = trainlib.compiled(rcm.features, args, device)                   # sg E: the online encoder itself
    if env.main:
        rundir.write_json(os.path.join(args.out, "config.json"), config)
    log(f"RCM-{args.model}/{patch_size} at {args.image_size}px, {models.count_params(rcm) / 1e6:.2f}M parameters "
        f"(encoder + projector); {data.describe(dataset)}; batch {args.batch_size} = {env.world} x {accum} x {micro}, "
        f"{args.steps} steps, "
        f"lr {lr:.4g} (= {args.lr:g} x {args.batch_size}/{BASE_BATCH}, {args.lr_schedule}, warm-up {args.warmup}), "
        f"shift s = {shift:g}, {device}")

    batches = iter(data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="pretrain",
                                    mode=args.normalize, start_step=start, num_workers=trainlib.num_workers(args, env),
                                    pin_memory=device.type == "cuda"))
    meter = trainlib.Meter(args, env, ("loss", "loss_ctr", "loss_rc"), start, f"pretrain RCM-{args.model}")
    stepper = trainlib.Stepper(optimizer, rcm, args.skip_nonfinite, buffers_of=(rcm, momentum), log=log)
    probe = None
    if env.main and args.probe_every:
        probe = evaluate.KnnProbe(*data.probe_sets(args.data, args.image_size, args.normalize, args.seed,
                                                   args.probe_bank, args.probe_queries), sigma_views, shift * 1.0)
        log(f"kNN probe: {len(probe.bank_y)} bank images, {len(probe.query_y)} queries")

    def run_probe(step):      # the online encoder's clean [CLS] feature (noisy queries: sigma = 1, unshifted)
        if probe is not None and (step == 0 or step % args.probe_every == 0 or step == args.steps):
            def features(x, sigma):
                with trainlib.autocast(device):
                    return rcm.features(*losses.precondition(x.to(device), torch.full((len(x),), sigma, device=device)))
            result = probe(features)
            meter.write(step=step, **result)
            log(f"probe step {step}: kNN acc clean {result['probe_acc']:.3f}, noisy {result['probe_acc_noisy']:.3f}")

    def state():
        return {"stage": "pretrain", "config": config, "step": step + 1, "model": rcm.state_dict(),
                "momentum": momentum.state_dict(), "optimizer": optimizer.state_dict()}

    # ---- the loop ----
    if start == 0:
        run_probe(0)
    mine = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    for step in range(start, args.steps):
        trainlib.seed_step(args.seed, step, env.rank)                             # global RNG: f(seed, step, rank)
        lr_now = trainlib.set_lr(optimizer, trainlib.learning_rate(step, args, lr))
        batch = trainlib.to_device(next(batches), device)
        x, view1, view2 = batch["clean"], batch["view1"], batch["view2"]
        # t_n > t_{n-1} (unshifted, grid of N(k) points) and eps, drawn over the GLOBAL batch
        num_scales = losses.ict_num_scales(step, args.steps, args.scales_start, args.scales_end, args.curriculum)
        t_n, t_next, eps = losses.rcm_draws(trainlib.step_generators(args.seed, step), x, mine, args.batch_size,
                                            num_scales, args.shared_noise_index)
        tau_rc = losses.rc_tau(t_n, step, args.steps, args.tau1, args.tau2, args.tau_schedule)
        sigma_n, sigma_next = shift * t_n, shift * t_next                          # Table 9: shifted levels

        with trainlib.autocast(device):                                       # the stop-gradient keys, whole batch
            keys = losses.rcm_keys(momentum_fn, target_fn, x, view1, view2, eps, sigma_next, sigma_views)
        terms = torch.zeros(3, device=device)
        for part, sync in trainlib.micro_batches(net, local_batch, micro):
            with sync:
                with trainlib.autocast(device):
                    ctr, rc = losses.rcm_loss(net, keys, x[part], view1[part], view2[part], eps[part], sigma_n[part],
                                              sigma_views, tau_rc[part], args.ctr_tau, first=mine.start + part.start)
                loss = (args.ctr_weight * ctr + args.rc_weight * rc).mean()                  # lambda(t) = 1
                (loss / accum).backward()
            terms += torch.stack([loss, ctr.mean(), rc.mean()]).detach().float() / accum

        if stepper.step(terms[0], args.grad_clip, step + 1):
            trainlib.ema_update(momentum, rcm, args.momentum)                     # theta- <- m theta- + (1-m) theta
            meter.add(terms)
        meter.log(step + 1, stepper.norm, lr=lr_now, num_scales=num_scales, tau_rc=tau_rc.mean())
        run_probe(step + 1)
        rundir.checkpoint(env, args, step + 1, state)
    meter.close()
    log(f"done: {args.steps} steps, checkpoint {args.out}/ckpt_last.pt")


if __name__ == "__main__":
    rundir.cli_main(main)
