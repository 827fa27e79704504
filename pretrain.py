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
"""
import contextlib
import copy
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import models
import trainlib

# ----------------------------------------------------------------------------------------------------------------
# Defaults: the paper's Table 10 (pre-training) and Table 9 for RCM-S/B/L; --model T applies PRESETS["T"]
# ----------------------------------------------------------------------------------------------------------------
CONFIG = dict(
    model="B",                 # RCM-B/16, the paper's ablation model and its released encoder
    image_size=256,
    batch_size=1024,           # Table 10 (global)
    steps=600_000,             # Table 10
    lr=6e-4,                   # Table 10, at batch 1024; scaled by batch_size / 1024 (B.2). Official config: 2e-4
    weight_decay=0.03,         # Table 10 for RCM-S/B; RCM-L 0.05 (PRESETS)
    betas=[0.9, 0.999],        # Table 10 / B.2 "default betas"; official code 0.9 0.95
    warmup=0,                  # the paper states cosine decay only; official code: 10k steps linear from 0
    momentum=0.99,             # EMA of the momentum encoder (Table 10), constant
    ctr_tau=0.2,               # temperature of the contrastive term (Table 10)
    tau1=0.1, tau2=0.2,        # tau(t) = tau1 (1 - t) + tau2 t of the consistency term (§3.2, Table 10)
    tau_schedule="annealed",   # tau2 annealed to tau1 (paper); official released config: constant
    scales_start=20, scales_end=1280,  # discretisation steps N from 20 to 1280 (Table 9)
    curriculum="ict",          # N(k) of iCT (paper); official code's ceil variant: official
    normalize="simple",        # pixels -> [-1, 1]; official code: imagenet ((x - mean) / (2 std))
    out="runs/pretrain",
    ckpt_every=10_000, keep_every=50_000, log_every=100,   # the official code's checkpoint cadence
    probe_every=10_000, probe_bank=2000, probe_queries=1000,
)
BASE_BATCH = 1024              # the batch size at which lr is given
PRESETS = {
    # a 2-core CPU: minutes instead of months, while the probe accuracy clearly rises (BENCHMARKS.md)
    "T": dict(image_size=32, batch_size=32, steps=300, lr=3.2e-2, ckpt_every=100, keep_every=0, log_every=10,
              probe_every=100),
    "L": dict(weight_decay=0.05),   # Table 10, RCM-L
}
RESUME_KEYS = ("model", "image_size", "batch_size", "data_id", "seed", "normalize", "proj_dim", "curriculum",
               "shared_noise_index", "tau_schedule", "steps")


def parse_args(argv=None):
    p = trainlib.parser("RCM pre-training, stage 1 of EPG (paper §3.2, Table 10). --lr is the rate at batch 1024, "
                        "scaled linearly with --batch-size (B.2).", CONFIG)
    p.add_argument("--betas", type=float, nargs=2, default=CONFIG["betas"], metavar=("BETA1", "BETA2"), help="AdamW betas")
    p.add_argument("--warmup", type=int, default=CONFIG["warmup"], help="linear lr warm-up steps before the cosine")
    p.add_argument("--momentum", type=float, default=CONFIG["momentum"], help="EMA rate of the momentum encoder")
    p.add_argument("--tau-schedule", choices=("annealed", "interpolated", "constant"), default=CONFIG["tau_schedule"],
                   help="consistency temperature: tau1..tau2 with tau2 annealed to tau1 (paper), not annealed, or tau1")
    p.add_argument("--curriculum", choices=("ict", "official"), default=CONFIG["curriculum"],
                   help="discretisation curriculum N(k): iCT's formula or the official code's ceil variant")
    p.add_argument("--shared-noise-index", action="store_true",
                   help="one noise index n for the whole global batch (official code) instead of one per image")
    p.add_argument("--proj-dim", type=trainlib.positive_int, default=None,
                   help="projector output width (none: the model's, 256; 128 for T; official script 768)")
    p.add_argument("--normalize", choices=data.NORMALIZATIONS, default=CONFIG["normalize"], help="pixel normalisation")
    p.add_argument("--probe-every", type=int, default=CONFIG["probe_every"],
                   help="kNN probe every this many steps, plus step 0 and the end (0: off)")
    p.add_argument("--probe-bank", type=trainlib.positive_int, default=CONFIG["probe_bank"],
                   help="train images in the kNN memory bank")
    p.add_argument("--probe-queries", type=trainlib.positive_int, default=CONFIG["probe_queries"],
                   help="images the kNN probe classifies (held-out split, else train images outside the bank)")
    args = trainlib.parse(p, argv, CONFIG, PRESETS)
    if args.warmup < 0 or args.probe_every < 0:
        raise trainlib.UserError("--warmup and --probe-every must be >= 0")
    if not 0.0 <= args.momentum < 1.0:
        raise trainlib.UserError(f"--momentum must be in [0, 1), got {args.momentum}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# BatchNorm over the global batch
# ----------------------------------------------------------------------------------------------------------------
class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch of all processes for CPU (gloo) process groups, where nn.SyncBatchNorm
    cannot run; gradients flow through the differentiable all-reduce, as in SyncBatchNorm."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        count = dist_nn.all_reduce(x.new_full((1,), float(x.shape[0])))
        mean = dist_nn.all_reduce(x.sum(dim=0)) / count
        var = dist_nn.all_reduce((x - mean).pow(2).sum(dim=0)) / count                   # biased, as BatchNorm
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def sync_batchnorm(module, device):
    """The projector's BatchNorm with global-batch statistics (nn.SyncBatchNorm on GPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            bn = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device)
    return module


# ----------------------------------------------------------------------------------------------------------------
# kNN probe
# ----------------------------------------------------------------------------------------------------------------
class KnnProbe:
    """Weighted kNN accuracy (k = 20, votes exp(cos / 0.07), as InstDisc/DINO) of the online encoder's LN'd [CLS]
    feature. Bank: train images; queries: the held-out split, or else a fixed fifth of the train images, disjoint
    from the bank. Clean images enter at s * sigma_min like the views; `probe_acc_noisy` classifies queries noised to
    sigma = 1 (unshifted, fixed noise) against the clean bank: how well noisy inputs align with clean ones."""

    def __init__(self, args, device, log):
        train = data.build_dataset(args.data, args.image_size, "train", args.seed)
        try:
            held_out = data.build_dataset(args.data, args.image_size, "val", args.seed)
        except data.DataError:
            held_out = None
        g = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(train), generator=g).tolist()
        if held_out is not None:
            queries = [(held_out, i) for i in torch.randperm(len(held_out), generator=g)[:args.probe_queries].tolist()]
        else:
            queries, order = [(train, i) for i in order[:min(args.probe_queries, len(train) // 5)]], order[len(train) // 5:]
        bank = [(train, i) for i in order[:args.probe_bank]]
        if not queries or not bank:
            raise trainlib.UserError(f"the kNN probe needs at least 5 training images, the data has {len(train)}; "
                                     f"add images or pass --probe-every 0")
        log(f"kNN probe: {len(bank)} bank images, {len(queries)} queries "
            f"({'held-out split' if held_out is not None else 'train images outside the bank'})")
        self.bank_x, self.bank_y = self._load(bank, args.normalize)
        self.query_x, self.query_y = self._load(queries, args.normalize)
        self.noise = torch.randn(self.query_x.shape, generator=g)
        self.shift, self.device = losses.resolution_shift(args.image_size), device
        self.num_classes = int(max(self.bank_y.max(), self.query_y.max())) + 1

    @staticmethod
    def _load(items, mode):
        images, labels = zip(*(data.load_item(dataset, i)[:2] for dataset, i in items))
        return data.normalize(torch.stack(images).float() / 255.0, mode), torch.tensor(labels)

    @torch.no_grad()
    def _features(self, rcm, x, sigma):
        out = []
        for chunk in x.split(256):
            s = torch.full((chunk.shape[0],), sigma, device=self.device)
            with trainlib.autocast(self.device):
                out.append(F.normalize(rcm.features(*losses.precondition(chunk.to(self.device), s)).float(), dim=-1))
        return torch.cat(out)

    def _knn(self, query, bank):
        sim, idx = (query @ bank.T).topk(min(20, bank.shape[0]), dim=1)
        votes = torch.zeros(query.shape[0], self.num_classes, device=query.device)
        votes.scatter_add_(1, self.bank_y.to(query.device)[idx], (sim / 0.07).exp())
        return (votes.argmax(1).cpu() == self.query_y).float().mean().item()

    def __call__(self, rcm):
        s_min, s_noisy = self.shift * losses.SIGMA_MIN, self.shift * 1.0
        bank = self._features(rcm, self.bank_x, s_min)
        return {"probe_acc": round(self._knn(self._features(rcm, self.query_x, s_min), bank), 4),
                "probe_acc_noisy": round(self._knn(
                    self._features(rcm, self.query_x + s_noisy * self.noise, s_noisy), bank), 4)}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    env = trainlib.init_distributed(args.device)
    device, log = env.device, env.log
    try:
        patch_size = models.patch_size_for(args.model, args.image_size)
    except ValueError as e:
        raise trainlib.UserError(str(e)) from None
    local_batch, micro, accum = trainlib.split_batch(args.batch_size, env.world, args.micro_batch)
    lr = args.lr * args.batch_size / BASE_BATCH                                   # linear scaling rule (B.2)
    shift = losses.resolution_shift(args.image_size)                              # s = image_size / 64 (Table 9)
    sigma_views = shift * losses.SIGMA_MIN                                        # the views sit at s * sigma_min

    # ---- data, output directory, resume ----
    dataset = data.build_dataset(args.data, args.image_size, "train", args.seed)
    config = {**{k: v for k, v in vars(args).items() if k not in ("device", "num_workers", "compile")},
              "stage": "pretrain", "proj_dim": args.proj_dim or models.model_config(args.model)["proj_dim"],
              "patch_size": patch_size, "lr_scaled": lr, "num_classes": dataset.num_classes,
              "data_id": data.identity(dataset), "resolution_shift": shift}
    trainlib.prepare_output(args.out, env.main)
    ckpt_path = os.path.join(args.out, "ckpt_last.pt")
    resume = trainlib.load_checkpoint(ckpt_path, "pretrain") if os.path.exists(ckpt_path) else None
    if resume is not None:
        trainlib.check_resume(resume["config"], config, RESUME_KEYS)
        if resume["step"] >= args.steps:
            log(f"{ckpt_path} is already at step {resume['step']} >= --steps {args.steps}; nothing to do")
            return
    log(f"RCM-{args.model}/{patch_size} at {args.image_size}px, shift s = {shift:g}, {env.world} process(es) on "
        f"{device}, global batch {args.batch_size} = {env.world} x {accum} x {micro}, lr {lr:.4g} "
        f"(= {args.lr:g} x {args.batch_size}/{BASE_BATCH}, cosine, warm-up {args.warmup}), {args.steps} steps")

    # ---- model, momentum copy, optimiser ----
    torch.manual_seed(args.seed)
    rcm = models.build_rcm(args.model, args.image_size, config["proj_dim"])
    momentum = copy.deepcopy(rcm).requires_grad_(False)
    if env.distributed:                                                           # global-batch BN in the projector
        rcm, momentum = sync_batchnorm(rcm, device), sync_batchnorm(momentum, device)
    # MoCo v3 keeps the momentum branch in train mode (batch statistics in its projector BN). The official code puts
    # it in eval mode, where its never-updated running statistics stay 0/1: a bug we do not copy.
    momentum.train()
    step = 0
    if resume is not None:
        rcm.load_state_dict(resume["model"])
        momentum.load_state_dict(resume["momentum"])
        step = resume["step"]
    rcm.to(device)
    momentum.to(device)
    optimizer = trainlib.adamw(rcm, lr, tuple(args.betas), args.weight_decay, device=device)  # all decayed
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        log(f"resumed from {ckpt_path} at step {step}")
    del resume
    online = trainlib.compiled(models.RCMViews(rcm, with_rest=True), args, device)                 # every pass compiled on CUDA
    if env.distributed:
        online = DDP(online, device_ids=[device.index] if device.type == "cuda" else None)
    momentum_fn = trainlib.compiled(models.RCMViews(momentum), args, device)
    target_fn = trainlib.compiled(rcm.features, args, device)                   # sg E: the online encoder itself
    log(f"parameters: {models.count_params(rcm) / 1e6:.2f}M (encoder + projector)")

    stream = iter(data.BatchStream(dataset, args.batch_size, env.rank, env.world, args.seed, views="pretrain",
                                   mode=args.normalize, start_step=step, num_workers=trainlib.num_workers(args, env),
                                   pin_memory=device.type == "cuda"))
    metrics = trainlib.MetricsLog(os.path.join(args.out, "metrics.jsonl"), env.main, resume_step=step)
    if env.main:
        trainlib.write_json(os.path.join(args.out, "config.json"), config)
    probe = KnnProbe(args, device, log) if (env.main and args.probe_every) else None

    def run_probe():
        if probe is not None:
            result = probe(rcm)
            metrics.write(step=step, **result)
            log(f"probe step {step}: kNN acc clean {result['probe_acc']:.3f}, noisy (sigma=1) "
                f"{result['probe_acc_noisy']:.3f}")

    def save(path):
        if not all(t.isfinite().all() for t in rcm.state_dict().values() if t.is_floating_point()):
            raise trainlib.UserError(f"the weights became non-finite at or before step {step}; the last good "
                                     f"checkpoint was kept. Lower --lr or pass --skip-nonfinite")
        trainlib.save_checkpoint(path, {"stage": "pretrain", "config": config, "step": step, "model": rcm.state_dict(),
                                        "momentum": momentum.state_dict(), "optimizer": optimizer.state_dict()})

    if step == 0:
        run_probe()
    sums = torch.zeros(3, device=device)                                          # loss, contrastive, consistency
    applied, speed = 0, trainlib.Throughput(device)
    bar = trainlib.progress(args.steps, step, env.main, f"pretrain RCM-{args.model}")
    mine = slice(env.rank * local_batch, (env.rank + 1) * local_batch)
    while step < args.steps:
        trainlib.seed_step(args.seed, step, env.rank)
        trainlib.set_lr(optimizer, trainlib.warmup_cosine(step, args.steps, lr, args.warmup))
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items() if torch.is_tensor(v)}
        x, y1, y2 = batch["clean"], batch["view1"], batch["view2"]
        # t_n > t_{n-1} (unshifted, grid of N(k) points) and eps for the GLOBAL batch; this rank takes its slice
        num_scales = losses.ict_num_scales(step, args.steps, args.scales_start, args.scales_end, args.curriculum)
        sigma_n, sigma_next = losses.rc_noise_pair(args.batch_size, num_scales, trainlib.step_generator(
            args.seed, step, "cpu", 0), shared=args.shared_noise_index, device=device)
        eps = torch.randn((args.batch_size, 3, args.image_size, args.image_size), device=device,
                          generator=trainlib.step_generator(args.seed, step, device, 1))[mine]
        tau_rc = losses.rc_tau(sigma_n[mine], step, args.steps, args.tau1, args.tau2, args.tau_schedule)
        sigma_n, sigma_next = shift * sigma_n[mine], shift * sigma_next[mine]    # Table 9: shifted levels
        if args.skip_nonfinite:       # BatchNorm statistics, restored if this step is skipped (forward updates them)
            buffers = [b.clone() for m in (rcm, momentum) for b in m.buffers()]

        with trainlib.autocast(device):                                       # the stop-gradient keys, whole batch
            keys = losses.rcm_keys(momentum_fn, target_fn, x, y1, y2, eps, sigma_next, sigma_views)
        step_sums = torch.zeros(3, device=device)
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            with online.no_sync() if (env.distributed and m < accum - 1) else contextlib.nullcontext():
                with trainlib.autocast(device):
                    ctr, rc = losses.rcm_loss(online, keys, x[part], y1[part], y2[part], eps[part], sigma_n[part],
                                              sigma_views, tau_rc[part], args.ctr_tau, first=mine.start + m * micro)
                loss = (ctr + rc).mean()                                          # lambda(t) = 1
                (loss / accum).backward()
            step_sums += torch.stack([loss, ctr.mean(), rc.mean()]).detach() / accum

        step += 1
        log_now = step % args.log_every == 0 or step == args.steps
        gnorm = trainlib.grad_norm(rcm) if log_now else None
        if args.skip_nonfinite and not (torch.isfinite(trainlib.all_reduce_mean(step_sums.clone())[0])
                                        & torch.isfinite(trainlib.grad_norm(rcm))).item():
            log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
            for b, saved in zip((b for m in (rcm, momentum) for b in m.buffers()), buffers):
                b.copy_(saved)
        else:
            optimizer.step()
            trainlib.ema_update(momentum, rcm, args.momentum)                     # theta- <- m theta- + (1-m) theta
            sums += step_sums
            applied += 1
        optimizer.zero_grad(set_to_none=True)
        speed.add(args.batch_size)
        bar.update(1)

        if log_now:
            loss_v, ctr_v, rc_v = (trainlib.all_reduce_mean(sums) / max(applied, 1)).tolist()
            trainlib.check_finite(loss_v, step)
            metrics.write(step=step, loss=loss_v, loss_ctr=ctr_v, loss_rc=rc_v, lr=optimizer.param_groups[0]["lr"],
                          grad_norm=gnorm.item(), images_per_s=speed.rate(), peak_mem_gb=trainlib.peak_memory_gb(device),
                          num_scales=num_scales, tau_rc=tau_rc.mean().item())
            bar.set_postfix(loss=f"{loss_v:.3f}", ctr=f"{ctr_v:.3f}", rc=f"{rc_v:.3f}")
            sums.zero_()
            applied = 0
        if args.probe_every and (step % args.probe_every == 0 or step == args.steps):
            run_probe()
        stop = trainlib.preempted(env)
        if env.main and (step % args.ckpt_every == 0 or step == args.steps or stop):
            save(ckpt_path)
        if env.main and args.keep_every and step % args.keep_every == 0:
            save(os.path.join(args.out, f"ckpt_{step:07d}.pt"))
        if stop:
            raise trainlib.Preempted(f"SIGTERM: stopped after step {step}, checkpoint {ckpt_path}; rerun to resume")
    bar.close()
    log(f"done: {args.steps} steps, checkpoint {ckpt_path}")


if __name__ == "__main__":
    trainlib.cli_main(main, data.DataError)
