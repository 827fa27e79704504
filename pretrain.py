"""Stage 1 of EPG: pre-training the Representation Consistency Model (RCM) by self-supervision (paper §3.2, eq. 6-8).

The RCM is the ViT encoder E plus a 3-layer projector L (Table 8). Every step draws, for each image x of the batch,
two MoCo v3 views y1, y2, one Gaussian noise eps (shared by all four inputs below) and an adjacent pair of noise
levels t_n > t_{n-1} of the Karras grid with N(k) points (iCT curriculum 20 -> 1280, Table 9), and minimises eq. 8:

    contrastive:                NT-Xent( L(E(y1~)),  sg L-(E-(y2~)) ) + NT-Xent( L(E(y2~)), sg L-(E-(y1~)) ),  tau 0.2
    representation consistency: NT-Xent( E(x + t_n eps),  sg E(x + t_{n-1} eps) ),                         tau(t_n)

with y~ = y + s sigma_min eps the views at the data end of the trajectory, E-/L- the momentum (EMA 0.99) copy,
sg E the online encoder itself under stop-gradient, and NT-Xent (eq. 7) over the global batch's keys. Both terms use
the [CLS] token: the contrastive term after the projector, the consistency term the encoder's LN'd feature. Every
noise level is multiplied by s = image_size / 64 (Table 9, "shifting of noise level") before it is added to the image
and before c_in(sigma) = 1/sqrt(sigma^2 + sigma_data^2) and c(t) = 250 ln sigma are taken; the grid index and tau(t)
use the unshifted level. lambda(t) = 1. AdamW, cosine learning rate (Table 10).

A k-nearest-neighbour probe of the online encoder's clean [CLS] feature measures what was learnt (see `KnnProbe`).

Examples:
    python pretrain.py --model T --steps 300 --out runs/pt                    # CPU, embedded data, ~4 min
    torchrun --nproc_per_node 8 pretrain.py --model B --data /data/imagenet256 --out runs/rcm_b
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        pretrain.py --model L --data /data/imagenet256 --out runs/rcm_l
    # the official code's settings instead of the paper's:
    ... --shared-noise-index --betas 0.9 0.95 --warmup 10000 --tau-schedule constant --proj-dim 768 \\
        --curriculum official --normalize imagenet

The checkpoint OUT/ckpt_last.pt holds {"stage": "pretrain", "config", "step", "model", "momentum", "optimizer"}
("model" and "momentum" are RCM state dicts); train_diffusion.py / train_consistency.py --init take its "model".
"""
import contextlib
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import trainlib

# ----------------------------------------------------------------------------------------------------------------
# Defaults: the paper's Table 10 (pre-training) and Table 9 (diffusion settings) for RCM-S/B/L.
# ----------------------------------------------------------------------------------------------------------------
CONFIG = dict(
    model="B",                 # RCM-B/16: the paper's ablation model and its released pre-trained encoder
    batch_size=1024,           # Table 10 (global). The official script sets 8, a debug leftover
    steps=600_000,             # Table 10
    lr=6e-4,                   # Table 10 at batch 1024, scaled linearly with the batch size (B.2); official config 2e-4
    betas=(0.9, 0.999),        # Table 10 / B.2 "default betas"; official code: --betas 0.9 0.95
    weight_decay=0.03,         # Table 10 for RCM-S/B (and T); RCM-L uses WEIGHT_DECAY_L
    warmup=0,                  # the paper states cosine decay only; official code: --warmup 10000 (linear from 0)
    momentum=0.99,             # EMA of the momentum encoder E- (Table 10), constant, no MoCo cosine ramp
    ctr_tau=0.2,               # temperature of the contrastive term (Table 10)
    tau1=0.1, tau2=0.2,        # tau(t) = tau1 (1 - t) + tau2 t of the consistency term (§3.2, Table 10)
    tau_schedule="annealed",   # tau2 annealed to tau1 (paper); official released config: --tau-schedule constant
    scales_start=20, scales_end=1280,  # discretisation steps N from 20 to 1280 (Table 9)
    curriculum="ict",          # N(k) as in iCT (paper); official code's ceil variant: --curriculum official
    shared_noise_index=False,  # n ~ U per sample (paper); official code: one n per global batch
    proj_dim=None,             # projector output: 256 (reproduces Table 8's parameter counts); official script 768
    normalize="simple",        # pixels -> [-1, 1]; official code: --normalize imagenet ((x - mean) / (2 std))
    out="runs/pretrain",
    ckpt_every=10_000,         # the official code writes its latest checkpoint every 10k steps ...
    keep_every=50_000,         # ... and keeps one every 50k
    log_every=100,
    probe_every=10_000,        # kNN probe cadence (also at step 0 and at the end); 0 switches the probe off
    probe_bank=2000,           # memory bank: a fixed random subset of the train split
    probe_queries=1000,        # queries: a fixed random subset of the held-out split
    probe_k=20,                # k of the weighted kNN vote
)
WEIGHT_DECAY_L = 0.05          # Table 10, RCM-L
# --model T on a 2-core CPU: the paper's batch 1024 x 600k steps would take months. These keep
# `python pretrain.py --model T --steps 300` at a few minutes while the probe accuracy clearly rises.
TINY = dict(batch_size=32, steps=300, lr=3.2e-2, ckpt_every=100, keep_every=0, log_every=10, probe_every=100)
BASE_BATCH = 1024              # the batch size at which `lr` is given (lr = lr * batch_size / 1024)


def parse_args(argv=None):
    defaults = {**CONFIG, **{k: None for k in ("batch_size", "steps", "lr", "ckpt_every", "keep_every",
                                                "log_every")}}
    p = trainlib.common_parser(
        "RCM pre-training (stage 1 of EPG). Defaults are the paper's (Table 10); with --model T and no explicit "
        f"value: {', '.join(f'{k}={v}' for k, v in TINY.items())}. Otherwise batch-size 1024, steps 600000, "
        "lr 6e-4 (at batch 1024, scaled by batch-size/1024), ckpt-every 10000, keep-every 50000, log-every 100.",
        defaults)
    p.add_argument("--betas", type=float, nargs=2, default=list(CONFIG["betas"]), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (official code: 0.9 0.95)")
    p.add_argument("--warmup", type=int, default=CONFIG["warmup"],
                   help="linear learning-rate warm-up steps before the cosine decay (official code: 10000)")
    p.add_argument("--momentum", type=float, default=CONFIG["momentum"], help="EMA rate of the momentum encoder")
    p.add_argument("--tau-schedule", choices=("annealed", "interpolated", "constant"), default=CONFIG["tau_schedule"],
                   help="temperature of the consistency loss: tau1..tau2 over t with tau2 annealed to tau1 (paper), "
                   "not annealed, or constant tau1 (official released config)")
    p.add_argument("--curriculum", choices=("ict", "official"), default=CONFIG["curriculum"],
                   help="discretisation curriculum N(k): iCT's formula (paper) or the official code's ceil variant")
    p.add_argument("--shared-noise-index", action="store_true",
                   help="one noise index n for the whole global batch (official code) instead of one per image")
    p.add_argument("--proj-dim", type=trainlib.positive_int, default=None,
                   help="projector output width (default 256; 128 for T; official script: 768)")
    p.add_argument("--normalize", choices=data.NORMALIZATIONS, default=CONFIG["normalize"],
                   help="pixel normalisation: simple = [-1, 1]; imagenet = (x - mean) / (2 std) (official code)")
    p.add_argument("--probe-every", type=int, default=None,
                   help=f"kNN probe every this many steps, plus step 0 and the end; 0: off (default "
                   f"{CONFIG['probe_every']}, {TINY['probe_every']} for T)")
    p.add_argument("--probe-bank", type=trainlib.positive_int, default=CONFIG["probe_bank"],
                   help="train images in the kNN memory bank")
    p.add_argument("--probe-queries", type=trainlib.positive_int, default=CONFIG["probe_queries"],
                   help="held-out images classified by the kNN probe")
    args = p.parse_args(argv)
    for key in ("batch_size", "steps", "lr", "ckpt_every", "keep_every", "log_every", "probe_every"):
        if getattr(args, key) is None:
            setattr(args, key, TINY[key] if args.model == "T" else CONFIG[key])
    for key, value in CONFIG.items():          # settings without a flag (recorded in the checkpoint's config)
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.weight_decay is None:
        args.weight_decay = WEIGHT_DECAY_L if args.model == "L" else CONFIG["weight_decay"]
    return args


# ----------------------------------------------------------------------------------------------------------------
# The online branch as one module: DDP wants exactly one forward per backward
# ----------------------------------------------------------------------------------------------------------------
class OnlineBranch(nn.Module):
    """E and L of eq. 8 on [y1~; y2~; x_n] in one encoder pass; the projector sees each view on its own, so its
    BatchNorm statistics are per view, as in MoCo v3. The checkpoint holds `self.rcm`'s state dict."""

    def __init__(self, rcm):
        super().__init__()
        self.rcm = rcm

    def forward(self, x_in, c_noise):
        """x_in: (3b, 3, H, W) preconditioned [y1~; y2~; x_n], c_noise: (3b,).
        Returns q1, q2: (b, proj_dim) projections of the views; h_n: (b, D) LN'd CLS feature of x_n."""
        h1, h2, h_n = self.rcm.features(x_in, c_noise).chunk(3)
        return self.rcm.projector(h1), self.rcm.projector(h2), h_n


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d with statistics over the global batch of all processes, for CPU (gloo) process groups, where
    nn.SyncBatchNorm cannot run (it is GPU-only). Same parameters and buffers as nn.BatchNorm1d; gradients flow
    through the differentiable all-reduce, as in SyncBatchNorm. Eval mode uses the running statistics."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        count = dist_nn.all_reduce(x.new_full((1,), float(x.shape[0])))
        mean = dist_nn.all_reduce(x.sum(dim=0)) / count
        var = dist_nn.all_reduce((x - mean).pow(2).sum(dim=0)) / count                   # biased, as BatchNorm
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), m)  # unbiased, as BatchNorm
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def sync_batchnorm(module, device):
    """The projector's BatchNorm with global-batch statistics when world > 1 (nn.SyncBatchNorm on GPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            sync_batchnorm(child, device)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Representation probe
# ----------------------------------------------------------------------------------------------------------------
class KnnProbe:
    """Weighted k-nearest-neighbour accuracy of the online encoder's LN'd [CLS] feature (cosine similarity, k = 20,
    votes weighted by exp(similarity / 0.07), as in InstDisc/DINO). It probes the online encoder, the one that
    fine-tuning starts from.

    Memory bank: `bank` images of a fixed random subset of the train split; queries: `queries` images of the held-out
    split (or, when the data has none, further train images disjoint from the bank). Images are clean (flip-free,
    un-augmented) and enter at the data end of the trajectory, time input s * sigma_min, like the contrastive views.
    `probe_acc_noisy` classifies queries noised to sigma = 1 (unshifted; s * 1 after the shift, same fixed noise every
    time) against the clean bank: how well noisy inputs are aligned with clean ones, the point of the RC loss.
    """

    NOISY_SIGMA = 1.0

    def __init__(self, train_set, val_set, bank, queries, image_size, mode, device, seed=0, k=20, batch=256):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_set), generator=g).tolist()
        bank_idx = order[:bank]
        if val_set is not None:
            query_set, query_idx = val_set, torch.randperm(len(val_set), generator=g)[:queries].tolist()
        else:
            query_set, query_idx = train_set, order[bank:bank + queries]
        self.bank_x, self.bank_y = self._load(train_set, bank_idx, mode)
        self.query_x, self.query_y = self._load(query_set, query_idx, mode)
        self.noise = torch.randn(self.query_x.shape, generator=g)
        self.shift, self.device, self.k, self.batch = losses.resolution_shift(image_size), device, k, batch
        self.num_classes = int(max(self.bank_y.max(), self.query_y.max())) + 1

    @staticmethod
    def _load(dataset, indices, mode):
        images, labels = zip(*(data._load_item(dataset, i)[:2] for i in indices))
        return data.normalize(torch.stack(images).float() / 255.0, mode), torch.tensor(labels)

    @torch.no_grad()
    def _features(self, rcm, x, sigma):
        """LN'd CLS features (n, D), L2-normalised, of images x (n, 3, H, W) already noised to shifted `sigma`."""
        out = []
        for chunk in x.split(self.batch):
            chunk = chunk.to(self.device)
            s = torch.full((chunk.shape[0],), sigma, device=self.device)
            with trainlib.autocast(self.device):
                h = rcm.features(chunk * losses.c_in(s)[:, None, None, None], losses.c_noise(s))
            out.append(torch.nn.functional.normalize(h.float(), dim=-1))
        return torch.cat(out)

    def _knn(self, query, bank):
        sim, idx = (query @ bank.T).topk(min(self.k, bank.shape[0]), dim=1)        # (Q, k)
        votes = torch.zeros(query.shape[0], self.num_classes, device=query.device)
        votes.scatter_add_(1, self.bank_y.to(query.device)[idx], (sim / 0.07).exp())
        return (votes.argmax(1).cpu() == self.query_y).float().mean().item()

    def __call__(self, rcm):
        sigma_min = self.shift * losses.SIGMA_MIN
        sigma_noisy = self.shift * self.NOISY_SIGMA
        bank = self._features(rcm, self.bank_x, sigma_min)
        clean = self._features(rcm, self.query_x, sigma_min)
        noisy = self._features(rcm, self.query_x + sigma_noisy * self.noise, sigma_noisy)
        return {"probe_acc": self._knn(clean, bank), "probe_acc_noisy": self._knn(noisy, bank)}


def build_probe(args, device, log):
    train_set = data.build_dataset(args.data, args.image_size, "train", args.seed)
    try:
        val_set = data.build_dataset(args.data, args.image_size, "val", args.seed)
    except data.DataError:
        val_set = None
        log("kNN probe: the data has no validation split; queries are train images outside the memory bank")
    bank = min(args.probe_bank, len(train_set) - (0 if val_set is not None else 1))
    return KnnProbe(train_set, val_set, bank, args.probe_queries, args.image_size, args.normalize, device,
                    seed=args.seed)


def precondition(images, sigma):
    """Network inputs of noisy images (b, 3, H, W) at shifted noise levels sigma (b,): c_in(sigma) x and c(sigma)
    (Table 9 preconditioning and time condition)."""
    return images * losses.c_in(sigma)[:, None, None, None], losses.c_noise(sigma)


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping
# ----------------------------------------------------------------------------------------------------------------
RESUME_KEYS = ("model", "image_size", "batch_size", "data", "seed", "normalize", "proj_dim", "curriculum",
               "shared_noise_index", "tau_schedule")


def truncate_metrics(path, step):
    """After a resume, drop the records a killed run logged beyond the checkpoint's step (they are logged again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def checkpoint_state(config, step, rcm, momentum, optimizer):
    return {"stage": "pretrain", "config": config, "step": step, "model": rcm.state_dict(),
            "momentum": momentum.state_dict(), "optimizer": optimizer.state_dict()}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.model not in models.MODEL_CONFIGS:
        raise trainlib.UserError(f"unknown --model {args.model}; choose one of {', '.join(models.MODEL_CONFIGS)}")
    trainlib.resolve_image_size(args)
    try:
        patch_size = models.patch_size_for(args.model, args.image_size)
    except ValueError as e:
        raise trainlib.UserError(str(e)) from None
    for flag, value in (("--warmup", args.warmup), ("--keep-every", args.keep_every),
                        ("--probe-every", args.probe_every)):
        if value < 0:
            raise trainlib.UserError(f"{flag} must be >= 0, got {value}")
    if not 0.0 <= args.momentum < 1.0:
        raise trainlib.UserError(f"--momentum must be in [0, 1), got {args.momentum}")

    dist_info = trainlib.init_distributed(args.device)
    device, rank, world, is_main = dist_info.device, dist_info.rank, dist_info.world, dist_info.is_main
    log = print if is_main else (lambda *a, **k: None)
    local_batch, micro_batch, accumulation = trainlib.split_batch(args.batch_size, world, args.micro_batch)
    lr = args.lr * args.batch_size / BASE_BATCH                                   # linear scaling rule (B.2)
    shift = losses.resolution_shift(args.image_size)                              # s = image_size / 64 (Table 9)
    proj_dim = args.proj_dim or models.model_config(args.model)["proj_dim"]
    num_workers = args.num_workers if args.num_workers is not None else (8 if device.type == "cuda" else 0)

    train_set = data.build_dataset(args.data, args.image_size, "train", args.seed)
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "pretrain", "proj_dim": proj_dim, "patch_size": patch_size, "lr_scaled": lr,
              "num_classes": train_set.num_classes, "resolution_shift": shift, "world_size": world}

    # --- output directory and resume (checked before anything heavy is built) ---
    trainlib.check_output_dir(args.out)
    ckpt_path = os.path.join(args.out, "ckpt_last.pt")
    resume = None
    if os.path.exists(ckpt_path):
        resume = trainlib.load_checkpoint(ckpt_path, stage="pretrain")
        trainlib.check_resume_compatible(resume["config"], config, RESUME_KEYS)
        if resume["step"] >= args.steps:
            log(f"{ckpt_path} is already at step {resume['step']} >= --steps {args.steps}; nothing to do")
            return
    if is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)

    log(f"RCM-{args.model}/{patch_size} at {args.image_size}px, noise shift s = {shift:g}, {world} process(es), "
        f"device {device}, global batch {args.batch_size} = {world} x {accumulation} x {micro_batch}")
    log(f"lr = {args.lr:g} x {args.batch_size}/{BASE_BATCH} = {lr:.4g} (cosine, warm-up {args.warmup}), "
        f"betas {tuple(args.betas)}, weight decay {args.weight_decay}, {args.steps} steps")

    # --- model, momentum copy, optimiser ---
    torch.manual_seed(args.seed)
    rcm = models.build_rcm(args.model, args.image_size, proj_dim)
    momentum = copy.deepcopy(rcm).requires_grad_(False)
    if world > 1:                                                                 # SyncBN in the projector
        rcm, momentum = sync_batchnorm(rcm, device), sync_batchnorm(momentum, device)
    # MoCo v3 keeps the momentum encoder in train mode, so its projector BatchNorm normalises with batch statistics.
    # (The official code puts it in eval mode, where its BN never updated running stats stay 0/1 forever: a bug.)
    momentum.train()
    step = 0
    if resume is not None:
        rcm.load_state_dict(resume["model"])
        momentum.load_state_dict(resume["momentum"])
        step = resume["step"]
    rcm.to(device)
    momentum.to(device)
    optimizer = trainlib.adamw(rcm, lr, tuple(args.betas), args.weight_decay, device=device)  # all params decayed
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if is_main:
            truncate_metrics(os.path.join(args.out, "metrics.jsonl"), step)
        log(f"resumed from {ckpt_path} at step {step}")
        del resume
    model = trainlib.maybe_compile(OnlineBranch(rcm), args, device)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"parameters: {sum(p.numel() for p in rcm.parameters()) / 1e6:.2f}M (encoder + projector)")

    # --- data and probe ---
    stream = iter(data.BatchStream(train_set, args.batch_size, rank, world, args.seed, views="pretrain",
                                   mode=args.normalize, start_step=step, num_workers=num_workers,
                                   pin_memory=device.type == "cuda"))
    metrics = trainlib.MetricsLog(os.path.join(args.out, "metrics.jsonl"), enabled=is_main)
    probe = build_probe(args, device, log) if (is_main and args.probe_every) else None

    def run_probe(at_step):
        if probe is None:
            return
        t0 = time.perf_counter()
        result = probe(rcm)
        result = {"step": at_step, **{k: round(v, 4) for k, v in result.items()},
                  "probe_s": round(time.perf_counter() - t0, 2)}
        metrics.write(**result)
        log(f"probe step {at_step}: kNN acc clean {result['probe_acc']:.3f}, noisy(sigma=1) "
            f"{result['probe_acc_noisy']:.3f} ({result['probe_s']:.1f}s)")

    if step == 0:
        run_probe(0)

    # --- loop ---
    sigma0 = shift * losses.SIGMA_MIN                                             # the views sit at s * sigma_min
    sums = torch.zeros(3, device=device)                                          # loss, contrastive, consistency
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    steps_in_sums, throughput = 0, trainlib.Throughput(device)
    bar = trainlib.progress(args.steps, step, is_main, f"pretrain RCM-{args.model}")
    while step < args.steps:
        trainlib.seed_step(args.seed, step, rank)
        trainlib.set_lr(optimizer, trainlib.warmup_cosine(step, args.steps, lr, args.warmup))
        batch = next(stream)
        num_scales = losses.ict_num_scales(step, args.steps, args.scales_start, args.scales_end, args.curriculum)
        # noise levels and noise for the GLOBAL batch from a stream shared by all ranks; this rank takes its slice
        sigma_n, sigma_next = losses.rc_noise_pair(args.batch_size, num_scales, trainlib.step_generator(
            args.seed, step, "cpu", stream=0), shared=args.shared_noise_index, device=device)
        eps = torch.randn((args.batch_size, 3, args.image_size, args.image_size), device=device,
                          generator=trainlib.step_generator(args.seed, step, device, stream=1))
        mine = slice(rank * local_batch, (rank + 1) * local_batch)
        sigma_n, sigma_next, eps = sigma_n[mine], sigma_next[mine], eps[mine]
        tau_rc = losses.rc_tau(sigma_n, step, args.steps, args.tau1, args.tau2, args.tau_schedule)
        step_sums = torch.zeros(3, device=device)                                 # loss, contrastive, consistency
        if args.skip_nonfinite:       # BatchNorm statistics, restored if this step is skipped (forward updates them)
            buffers = [b.clone() for m in (rcm, momentum) for b in m.buffers()]

        for micro in range(accumulation):
            part = slice(micro * micro_batch, (micro + 1) * micro_batch)
            x, y1, y2 = (batch[k][part].to(device, non_blocking=True) for k in ("clean", "view1", "view2"))
            e = eps[part]
            b = x.shape[0]
            s_n = shift * sigma_n[part]                                           # shifted t_n, (b,)
            s_next = shift * sigma_next[part]                                     # shifted t_{n-1}, (b,)
            s_0 = torch.full((b,), sigma0, device=device)
            y1_t, y2_t = y1 + sigma0 * e, y2 + sigma0 * e                         # views at s * sigma_min
            x_n = x + s_n[:, None, None, None] * e                               # eq. 6: same eps on the trajectory
            x_next = x + s_next[:, None, None, None] * e

            with torch.no_grad(), trainlib.autocast(device):
                # momentum branch E-, L- (eq. 8): one encoder pass over both views, projector per view
                views_in, views_c = precondition(torch.cat([y1_t, y2_t]), torch.cat([s_0, s_0]))
                k1, k2 = (momentum.projector(h) for h in momentum.features(views_in, views_c).chunk(2))
                # stop-gradient target E_sg(theta)(x_{t_{n-1}}): the online encoder itself, features only
                h_next = trainlib.unwrap(model).rcm.features(*precondition(x_next, s_next))
            online_in, online_c = precondition(torch.cat([y1_t, y2_t, x_n]), torch.cat([s_0, s_0, s_n]))
            sync = contextlib.nullcontext() if (world == 1 or micro == accumulation - 1) else model.no_sync()
            with sync:
                with trainlib.autocast(device):
                    q1, q2, h_n = model(online_in, online_c)
                loss_ctr = losses.contrastive_loss(q1, q2, k1, k2, tau=args.ctr_tau)    # (b,)
                loss_rc = losses.nt_xent(h_n, h_next, tau_rc[part])                      # (b,)
                loss = (loss_ctr + loss_rc).mean()                                       # lambda(t) = 1
                (loss / accumulation).backward()
            step_sums += torch.stack([loss, loss_ctr.mean(), loss_rc.mean()]).detach() / accumulation

        step += 1
        log_now = step % args.log_every == 0 or step == args.steps
        gnorm = trainlib.grad_norm(rcm) if log_now else None
        if args.skip_nonfinite and not (torch.isfinite(trainlib.all_reduce_mean(step_sums.clone())[0])
                                        & torch.isfinite(trainlib.grad_norm(rcm))).item():
            log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
            optimizer.zero_grad(set_to_none=True)
            for b, saved in zip((b for m in (rcm, momentum) for b in m.buffers()), buffers):
                b.copy_(saved)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trainlib.ema_update(momentum, rcm, args.momentum)                     # theta- <- m theta- + (1-m) theta
            nonfinite |= ~torch.isfinite(step_sums[0])
            sums += step_sums
            steps_in_sums += 1
        throughput.add(args.batch_size)
        bar.update(1)

        if log_now:
            loss_v, ctr_v, rc_v = (trainlib.all_reduce_mean(sums) / max(steps_in_sums, 1)).tolist()  # global
            trainlib.check_finite(loss_v, step)
            record = dict(step=step, loss=loss_v, loss_ctr=ctr_v, loss_rc=rc_v,
                          lr=optimizer.param_groups[0]["lr"], grad_norm=gnorm.item(),
                          images_per_s=throughput.rate(), peak_mem_gb=trainlib.peak_memory_gb(device),
                          num_scales=num_scales, tau_rc=tau_rc.mean().item())
            metrics.write(**record)
            bar.set_postfix(loss=f"{loss_v:.3f}", ctr=f"{ctr_v:.3f}", rc=f"{rc_v:.3f}")
            if not sys.stderr.isatty():
                log(f"step {step}: loss {loss_v:.4f} (ctr {ctr_v:.4f}, rc {rc_v:.4f}), lr {record['lr']:.3g}, "
                    f"N {num_scales}, {record['images_per_s']:.0f} img/s")
            sums.zero_()
            steps_in_sums = 0
        if args.probe_every and (step % args.probe_every == 0 or step == args.steps):
            run_probe(step)

        save_last = step % args.ckpt_every == 0 or step == args.steps
        keep = args.keep_every and step % args.keep_every == 0
        if is_main and (save_last or keep):
            if nonfinite.item() or not all(t.isfinite().all() for t in rcm.state_dict().values()
                                           if t.is_floating_point()):
                raise trainlib.NonFiniteLoss(f"the loss or weights became non-finite at or before step {step}; no "
                                             f"checkpoint was written and the last good one was kept. Lower --lr "
                                             f"or pass --skip-nonfinite")
            state = checkpoint_state(config, step, rcm, momentum, optimizer)
            if keep:
                trainlib.save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), state)
            if save_last:
                trainlib.save_checkpoint(ckpt_path, state)
    bar.close()
    log(f"done: {args.steps} steps, checkpoint {ckpt_path}")


if __name__ == "__main__":
    trainlib.cli_main(main)
