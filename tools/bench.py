"""Speed of every EPG stage: images/s, achieved TFLOP/s, model FLOPs utilisation (MFU) and peak memory.

Each stage runs its real step on random images and labels (the losses of losses.py, AdamW, EMA, bf16 autocast and
torch.compile on CUDA, as the training scripts and sample.py). FLOPs per image: pretrain 12 encoder forwards, diffusion
3 EPG forwards, consistency 4 EPG + 3 encoder forwards, sampling 74 EPG forwards (Heun-32, interval CFG); a forward is
2 x the multiply-accumulates of its Linear/Conv layers and attention matmuls, a backward twice that. MFU = achieved
FLOP/s / the peak of a large matmul measured in the same run (bf16 on CUDA, fp32 on the CPU).

    python tools/bench.py --stage diffusion --model XL --batch-size 64 [--record]    # --record: rows to BENCHMARKS.md
    python tools/bench.py --stage all --model T --device cpu --batch-size 8 --iters 3
    python tools/bench.py --memory        # no GPU: memory per GPU of the paper's runs (--batch-size per GPU, 128)
"""
import argparse
import copy
import datetime
import functools
import os
import subprocess
import sys
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import losses  # noqa: E402
import models  # noqa: E402
import trainlib  # noqa: E402


def seconds_per_call(fn, device, warmup, iters):
    """Mean wall time of fn() over `iters` calls after `warmup` untimed ones (CUDA: and their peak memory)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def measure_peak_flops(device):
    """Achieved FLOP/s of a large matmul, the reference of MFU: bf16 8192^2 on CUDA, fp32 1024^2 on the CPU."""
    size, iters, dtype = (8192, 20, torch.bfloat16) if device.type == "cuda" else (1024, 5, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size ** 3 / seconds_per_call(lambda: a @ b, device, 3, iters)


# One step of each stage on a synthetic batch, through the objectives of losses.py -> (step, FLOPs per image)
def _images(args, device, n):
    return (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device) for _ in range(n))


def pretrain_stage(args, device):
    rcm = models.build_rcm(args.model, args.image_size).to(device)
    momentum = copy.deepcopy(rcm).requires_grad_(False)
    online = trainlib.compiled(models.RCMViews(rcm, with_rest=True), args, device)
    momentum_fn = trainlib.compiled(models.RCMViews(momentum), args, device)
    target_fn = trainlib.compiled(rcm.features, args, device)
    opt = trainlib.adamw(rcm, 1e-4, (0.9, 0.999), 0.03, device=device)
    b, s = args.batch_size, losses.resolution_shift(args.image_size)
    x, y1, y2 = _images(args, device, 3)
    t_n, t_next, eps = losses.rcm_draws(trainlib.step_generators(0, 0), x, slice(None), b, 641)
    s_n, s_next = s * t_n, s * t_next
    tau = torch.full((b,), 0.15, device=device)

    def step():
        with trainlib.autocast(device):
            keys = losses.rcm_keys(momentum_fn, target_fn, x, y1, y2, eps, s_next, s * losses.SIGMA_MIN)
            ctr, rc = losses.rcm_loss(online, keys, x, y1, y2, eps, s_n, s * losses.SIGMA_MIN, tau, 0.2, first=0)
        (ctr + rc).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainlib.ema_update(momentum, rcm, 0.99)
    return step, models.train_flops_per_image("pretrain", args.model, args.image_size)


def diffusion_stage(args, device):
    epg = models.build_epg(args.model, args.image_size, 1000).to(device)
    ema = copy.deepcopy(epg).requires_grad_(False)
    net = trainlib.compiled(epg, args, device)
    opt = trainlib.adamw(epg, 1e-4, (0.9, 0.999), 0.01, no_decay=("pos_embed", "cls_token"), device=device)
    x0, = _images(args, device, 1)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    sigma, weight, eps, y = losses.diffusion_draws(trainlib.step_generators(0, 0), x0, y, slice(None),
                                                   args.batch_size, 1000)

    def step():
        with trainlib.autocast(device):
            loss = losses.diffusion_loss(net, x0, y, sigma, weight, eps).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(epg.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainlib.ema_update(ema, epg, 0.9999)
    return step, models.train_flops_per_image("diffusion", args.model, args.image_size)


def consistency_stage(args, device):
    epg = models.build_epg(args.model, args.image_size, 1000, decoder_dropout=0.5).to(device)
    ema = copy.deepcopy(epg).requires_grad_(False)
    rcm = models.build_rcm(args.model, args.image_size).to(device).eval().requires_grad_(False)
    W, net = trainlib.compiled(rcm.features, args, device), trainlib.compiled(epg, args, device)
    opt = trainlib.adamw(epg, 1e-4, (0.9, 0.99), 0.01, no_decay=("pos_embed", "cls_token"), device=device)
    sigma_min = losses.resolution_shift(args.image_size) * losses.SIGMA_MIN
    x0, = _images(args, device, 1)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    t, r, eps, y = losses.consistency_draws(trainlib.step_generators(0, 0), x0, y, slice(None), args.batch_size,
                                            1000, stage=3)
    rng = [device.index or 0] if device.type == "cuda" else []

    def step():
        with trainlib.autocast(device):
            keys = losses.aux_keys(W, x0, sigma_min)
            cm, pred = losses.consistency_loss(net, net, x0, y, t, r, eps, sigma_min, rng_devices=rng)
            aux = losses.aux_loss(W, pred, keys, t, sigma_min, 0.1, "encoder", first=0)
        (cm + aux).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainlib.ema_update(ema, epg, 0.9999)
    return step, models.train_flops_per_image("consistency", args.model, args.image_size)


def sampling_stage(args, device):
    net = trainlib.compiled(models.build_epg(args.model, args.image_size, 1000).to(device).eval(), args, device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    counter = {}
    denoiser = losses.guided_denoiser(net, labels, 1000, losses.resolution_shift(args.image_size), cfg_scale=2.5,
                                      counter=counter, autocast=lambda: trainlib.autocast(device))
    sigmas = losses.sampling_sigmas(32, args.image_size)

    def step():
        losses.heun_sample(denoiser, sigmas[0] * next(_images(args, device, 1)), sigmas)
    step()                                   # count the network evaluations per image once
    return step, counter["forwards"] / args.batch_size * models.forward_flops("epg", args.model, args.image_size)


STAGES = {"pretrain": pretrain_stage, "diffusion": diffusion_stage, "consistency": consistency_stage,
          "sampling": sampling_stage}


# Memory per GPU of the paper's runs, estimated on the CPU
PAPER_RUNS = (("pretrain", "B", 256), *(("diffusion", m, 256) for m in ("S", "B", "L", "XL", "XXL", "G")),
              ("consistency", "L", 256), ("diffusion", "L", 512))
GPU_BYTES = {"80 GB": 80e9, "141 GB": 141e9}


class _Saved(Exception):
    """Raised by the first unpack of a step's backward: every tensor of the step has been saved by then."""


@functools.lru_cache(maxsize=None)
def saved_bytes(stage, model, image_size, batch, depth):
    """Bytes that one step of `stage` saves for backward under bf16 autocast on the CPU (each storage once, not the
    parameters), `model` cut to `depth` encoder and decoder blocks; the step stops where backward begins."""
    args = argparse.Namespace(model=model, image_size=image_size, batch_size=batch, compile=False)
    with mock.patch.dict(models.MODEL_CONFIGS[model], depth=depth):
        step, _ = STAGES[stage](args, torch.device("cpu"))
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def unpack(t):
        raise _Saved

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            step()
    except _Saved:
        return sum(storages.values())
    raise RuntimeError(f"the {stage} step ran no backward")


def activation_bytes(stage, model, image_size, batch):
    """saved_bytes at `batch` images and full depth, extrapolated bilinearly from 1 and 2 images (2 and 3 for
    pre-training's BatchNorm) and 1 and 2 blocks: exact for bytes a + b*batch + c*depth + d*batch*depth."""
    (b1, b2), (d1, d2) = ((2, 3) if stage == "pretrain" else (1, 2)), (1, 2)
    m = {(b, d): saved_bytes(stage, model, image_size, b, d) for b in (b1, b2) for d in (d1, d2)}
    u, v = (batch - b1) / (b2 - b1), (models.model_config(model)["depth"] - d1) / (d2 - d1)
    return round((1 - u) * (1 - v) * m[b1, d1] + u * (1 - v) * m[b2, d1] + (1 - u) * v * m[b1, d2]
                 + u * v * m[b2, d2])


def estimate_memory(stage, model, image_size=256, per_gpu_batch=128):
    """Bytes per GPU of a training step: fp32 parameters, gradients, AdamW moments, fp32 copies (EMA, momentum RCM,
    frozen RCM W) and activations (activation_bytes). -> dict of bytes, with their "total"."""
    count = lambda kind: models.count_params(models.build_on_meta(kind, model, image_size))
    n = count("rcm" if stage == "pretrain" else "epg")
    copies = n + (count("rcm") if stage == "consistency" else 0)
    parts = dict(params=4 * n, grads=4 * n, adamw=8 * n, copies=4 * copies,
                 activations=activation_bytes(stage, model, image_size, per_gpu_batch))
    return {**parts, "total": sum(parts.values())}


def memory_report(per_gpu_batch):
    """The table of BENCHMARKS.md; where a run does not fit, the largest --micro-batch (a divisor) that does."""
    print(f"memory per GPU at {per_gpu_batch} images per GPU, GiB (estimate; BENCHMARKS.md)")
    print("| stage | model | params | grads | AdamW | EMA/momentum/W | activations | total | "
          + " | ".join(f"fits in {name}?" for name in GPU_BYTES) + " |")
    for stage, model, size in PAPER_RUNS:
        parts, fits = estimate_memory(stage, model, size, per_gpu_batch), []
        for capacity in GPU_BYTES.values():
            micro = next((m for m in range(per_gpu_batch, 0, -1) if per_gpu_batch % m == 0
                          and estimate_memory(stage, model, size, m)["total"] <= capacity), 0)
            fits.append("yes" if micro == per_gpu_batch else f"--micro-batch {micro}" if micro else "no")
        name = f"{'RCM' if stage == 'pretrain' else 'EPG'}-{model}/{models.patch_size_for(model, size)} @{size}"
        print(f"| {stage} | {name} | " + " | ".join(f"{b / 2 ** 30:.1f}" for b in parts.values())
              + f" | {' | '.join(fits)} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="which stage to time")
    p.add_argument("--model", default="B", help="model size (T, S, B, L, XL, XXL, G)")
    p.add_argument("--image-size", type=int, default=None, help="none: 256 (32 for T)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (64; with --memory per GPU, 128)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    p.add_argument("--record", action="store_true", help="append the results as rows of BENCHMARKS.md")
    p.add_argument("--memory", action="store_true", help="estimate the memory per GPU of the paper's runs (no GPU)")
    args = p.parse_args()
    if args.memory:
        torch.set_num_threads(1)
        return memory_report(args.batch_size or 128)
    args.batch_size = args.batch_size or 64
    args.image_size = args.image_size or (32 if args.model == "T" else 256)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_peak_flops(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; measured peak {'bf16' if cuda else 'fp32'} matmul {peak / 1e12:.1f} TFLOP/s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    print("stage | model | device | precision | batch | img/s | TFLOP/s | MFU % | peak mem | commit | date")
    for stage in (STAGES if args.stage == "all" else [args.stage]):
        step, flops_per_image = STAGES[stage](args, device)
        images_per_s = args.batch_size / seconds_per_call(step, device, args.warmup, args.iters)
        del step                                 # frees this stage's model before the next one is built
        achieved = images_per_s * flops_per_image
        rows.append(f"| {stage} | {args.model}@{args.image_size} | {name} | {'bf16' if cuda else 'fp32'} | "
                    f"{args.batch_size} | {images_per_s:.1f} | {achieved / 1e12:.2f} | {100 * achieved / peak:.1f} | "
                    f"{trainlib.peak_memory_gb(device):.1f} GiB | {commit} | {datetime.date.today().isoformat()} |")
        print(rows[-1], flush=True)
    if args.record:
        with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
