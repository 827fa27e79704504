"""Speed of every EPG stage: images/s, achieved TFLOP/s, model FLOPs utilisation (MFU) and peak memory.

Each stage runs its real computation on synthetic data (random images and labels, so the data loader is not what is
measured): the same loss functions, optimiser (fused AdamW on CUDA), EMA update, bf16 autocast and torch.compile
as the training scripts and sample.py.

    pretrain     one RCM step: online encoder on [y1~; y2~; x_n] (fwd + bwd), stop-gradient target on x_next, momentum
                 encoder on both views, AdamW, momentum update                       -> 12 encoder forwards / image
    diffusion    one EPG step: eq. 1, AdamW, grad clip, EMA                          -> 3 EPG forwards / image
    consistency  one EPG step: target pass, online pass, auxiliary loss through the frozen RCM, AdamW, EMA
                                                                                      -> 4 EPG + 3 encoder forwards
    sampling     Heun-32 with interval CFG (74 network evaluations per image)         -> 74 EPG forwards / image

Model FLOPs = 2 x multiply-accumulates of every Linear/Conv *and* the attention matmuls (models.count_macs), with
backward = 2 x forward. MFU = achieved FLOP/s / the device's peak, *measured in the same run* (a large bf16 matmul on
CUDA, an fp32 one on CPU). Warm-up iterations (compilation included) are excluded; the device is synchronised
before every clock reading.

    python tools/bench.py --stage diffusion --model XL --batch-size 64                    # one H100/H200
    python tools/bench.py --stage all --model T --device cpu --batch-size 8 --iters 3     # CPU smoke run
    python tools/bench.py ... --record                                                    # append rows to BENCHMARKS.md

Without a GPU: `--stage data` times the data loader on one CPU core (ms per sample and the cores per GPU the speed
targets need); `--memory` estimates the memory per GPU of every paper configuration at 128 images per GPU.
"""
import argparse
import copy
import datetime
import functools
import os
import sys
import statistics
import subprocess
import tempfile
import time
from unittest import mock

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import trainlib  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device, size=8192, iters=20):
    """Achieved FLOP/s of a large matmul: bf16 on CUDA, fp32 on CPU (the reference for MFU)."""
    if device.type != "cuda":
        size, iters = 1024, 5
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * size ** 3 * iters / (time.perf_counter() - t0)


def forward_flops(model, image_size):
    """Hardware FLOPs of one forward pass of one image (Linear/Conv and attention matmuls)."""
    with torch.device("meta"):
        macs = models.count_macs(model, image_size)
    return 2 * (macs["linear"] + macs["attention"])


# ----------------------------------------------------------------------------------------------------------------
# One step of each stage (synthetic batch of b images), through the objectives of losses.py
# ----------------------------------------------------------------------------------------------------------------
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
    x, y1, y2, eps = _images(args, device, 4)
    s_n, s_next = (s * v for v in losses.rc_noise_pair(b, 641, device=device))
    tau = torch.full((b,), 0.15, device=device)

    def step():
        with trainlib.autocast(device):
            keys = losses.rcm_keys(momentum_fn, target_fn, x, y1, y2, eps, s_next, s * losses.SIGMA_MIN)
            ctr, rc = losses.rcm_loss(online, keys, x, y1, y2, eps, s_n, s * losses.SIGMA_MIN, tau, 0.2, first=0)
        (ctr + rc).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainlib.ema_update(momentum, rcm, 0.99)

    return step, 12 * forward_flops(models.build_rcm(args.model, args.image_size), args.image_size)


def diffusion_stage(args, device):
    epg = models.build_epg(args.model, args.image_size, 1000).to(device)
    ema = copy.deepcopy(epg).requires_grad_(False)
    net = trainlib.compiled(epg, args, device)
    opt = trainlib.adamw(epg, 1e-4, (0.9, 0.999), 0.01, no_decay=("pos_embed", "cls_token"), device=device)
    x0, eps = _images(args, device, 2)
    y = torch.randint(0, 1001, (args.batch_size,), device=device)
    sigma, weight = (v.to(device) for v in losses.diffusion_noise(args.batch_size))
    sigma = losses.resolution_shift(args.image_size) * sigma

    def step():
        with trainlib.autocast(device):
            loss = losses.diffusion_loss(net, x0, y, sigma, weight, eps).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(epg.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainlib.ema_update(ema, epg, 0.9999)

    return step, 3 * forward_flops(models.build_epg(args.model, args.image_size, 1000), args.image_size)


def consistency_stage(args, device):
    epg = models.build_epg(args.model, args.image_size, 1000, decoder_dropout=0.5).to(device)
    ema = copy.deepcopy(epg).requires_grad_(False)
    W = trainlib.compiled(models.build_rcm(args.model, args.image_size).to(device).eval().requires_grad_(False).features,
                          args, device)
    net = trainlib.compiled(epg, args, device)
    opt = trainlib.adamw(epg, 1e-4, (0.9, 0.99), 0.01, no_decay=("pos_embed", "cls_token"), device=device)
    s = losses.resolution_shift(args.image_size)
    sigma_min = s * losses.SIGMA_MIN
    x0, eps = _images(args, device, 2)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    t, r = (s * v.to(device) for v in losses.ct_time_pair(args.batch_size, stage=3))
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

    epg_flops = forward_flops(models.build_epg(args.model, args.image_size, 1000), args.image_size)
    enc_flops = forward_flops(models.build_rcm(args.model, args.image_size), args.image_size)
    return step, 4 * epg_flops + 3 * enc_flops


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
    nfe = counter["forwards"] / args.batch_size
    return step, nfe * forward_flops(models.build_epg(args.model, args.image_size, 1000), args.image_size)


STAGES = {"pretrain": pretrain_stage, "diffusion": diffusion_stage, "consistency": consistency_stage,
          "sampling": sampling_stage}


def bench(stage, args, device, peak):
    step, flops_per_image = STAGES[stage](args, device)
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    seconds = time.perf_counter() - t0
    images_per_s = args.batch_size * args.iters / seconds
    achieved = images_per_s * flops_per_image
    return dict(stage=stage, model=args.model, image_size=args.image_size, batch=args.batch_size,
                images_per_s=images_per_s, tflops=achieved / 1e12, mfu=100 * achieved / peak,
                peak_mem_gb=trainlib.peak_memory_gb(device))


# ----------------------------------------------------------------------------------------------------------------
# Data loading: CPU time per sample of the loader's real path, and the cores per GPU the speed targets need
# ----------------------------------------------------------------------------------------------------------------
H100_PEAK = 989e12                  # dense bf16 FLOP/s of an H100 SXM (an H200 has the same)


def data_seconds(views, image_size=256, images=32, repeats=3):
    """CPU seconds per sample (median of `repeats`) of a BatchStream item from an image folder: the PNG decode of
    data.ImageFolder (files stored as `data.py prepare` writes them) and data.augment(views)."""
    shapes = data.EmbeddedShapes(image_size=image_size, length=images)
    with tempfile.TemporaryDirectory() as root:
        for i in range(images):
            image, label = shapes[i]
            os.makedirs(os.path.join(root, str(label)), exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(root, str(label), f"{i}.png"),
                                                                 compress_level=0)
        folder = data.ImageFolder(root, image_size)
        data.augment(folder[0][0], 0, views)                     # builds the transforms once
        times = []
        for _ in range(repeats):
            start = time.process_time()
            for i in range(images):
                data.augment(data.load_item(folder, i)[0], i, views)
            times.append((time.process_time() - start) / images)
    return statistics.median(times)


def data_report():
    flops = lambda kind, name: forward_flops(models.build_on_meta(kind, name, 256), 256)
    targets = [("pretrain", "RCM-B/16 pre-training target", 750),
               ("finetune", "EPG-XL/16 diffusion at 55% MFU", 0.55 * H100_PEAK / (3 * flops("epg", "XL"))),
               ("finetune", "EPG-L/16 consistency at 50% MFU",
                0.50 * H100_PEAK / (4 * flops("epg", "L") + 3 * flops("rcm", "L")))]
    seconds = {views: data_seconds(views) for views in ("pretrain", "finetune")}
    print("data loading at 256x256, CPU time per sample on one thread (median of 3)")
    for views, what in (("pretrain", "decode + both MoCo v3 views + clean image"), ("finetune", "decode + flip")):
        print(f"  {views}: {1e3 * seconds[views]:.2f} ms per sample ({what})")
    for views, target, images_per_s in targets:
        print(f"  {target}: {images_per_s:.0f} img/s per GPU -> {images_per_s * seconds[views]:.1f} CPU cores per GPU")


# ----------------------------------------------------------------------------------------------------------------
# Memory per GPU at the paper's batch sizes, estimated on the CPU
# ----------------------------------------------------------------------------------------------------------------
PAPER_RUNS = (("pretrain", "B", 256), *(("diffusion", m, 256) for m in ("S", "B", "L", "XL", "XXL", "G")),
              ("consistency", "L", 256), ("diffusion", "L", 512))
GPU_BYTES = {"80 GB": 80e9, "141 GB": 141e9}


class _Saved(Exception):
    """Raised by the first unpack of a step's backward: every tensor of the step has been saved by then."""


@functools.lru_cache(maxsize=None)
def saved_bytes(stage, model, image_size, batch, depth):
    """Bytes that one step of `stage` (STAGES) saves for backward under bf16 autocast on the CPU, each storage
    counted once, parameters not counted; `model` with `depth` encoder and decoder blocks (same widths).
    Only the passes with gradient save tensors; the step is stopped where its backward begins."""
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
    """Saved-for-backward bytes of one step at `batch` images and the model's depth, extrapolated from four
    measurements at 1 and 2 images (2 and 3 for pre-training, whose BatchNorm needs two) and at 1 and 2 blocks
    (paper-size models are too slow on a CPU). Exact for bytes of the form a + b*batch + c*depth + d*batch*depth:
    activations per image and block, bf16 weight copies per block, embeddings and losses."""
    (b1, b2), (d1, d2) = ((2, 3) if stage == "pretrain" else (1, 2)), (1, 2)
    m = {(b, d): saved_bytes(stage, model, image_size, b, d) for b in (b1, b2) for d in (d1, d2)}
    u, v = (batch - b1) / (b2 - b1), (models.model_config(model)["depth"] - d1) / (d2 - d1)
    return round((1 - u) * (1 - v) * m[b1, d1] + u * (1 - v) * m[b2, d1] + (1 - u) * v * m[b1, d2]
                 + u * v * m[b2, d2])


def estimate_memory(stage, model, image_size=256, per_gpu_batch=128):
    """Bytes per GPU of a training step of `stage`: fp32 parameters, gradients and AdamW's two moments of the trained
    network, its fp32 copies (EMA; pre-training: the momentum RCM; consistency: the EMA and the frozen RCM W) and
    the activations of one step under bf16 autocast (activation_bytes). -> dict of bytes, with their "total"."""
    count = lambda kind: models.count_params(models.build_on_meta(kind, model, image_size))
    n = count("rcm" if stage == "pretrain" else "epg")
    copies = n + (count("rcm") if stage == "consistency" else 0)
    parts = dict(params=4 * n, grads=4 * n, adamw=8 * n, copies=4 * copies,
                 activations=activation_bytes(stage, model, image_size, per_gpu_batch))
    return {**parts, "total": sum(parts.values())}


def fitting_micro_batch(stage, model, image_size, per_gpu_batch, capacity):
    """The largest divisor of per_gpu_batch whose step fits in `capacity` bytes (estimate_memory), 0 if none does."""
    return next((m for m in range(per_gpu_batch, 0, -1) if per_gpu_batch % m == 0
                 and estimate_memory(stage, model, image_size, m)["total"] <= capacity), 0)


def memory_report(per_gpu_batch=128):
    print(f"memory per GPU at {per_gpu_batch} images per GPU, GiB (estimate; BENCHMARKS.md)")
    print("| stage | model | params | grads | AdamW | EMA/momentum/W | activations | total | "
          + " | ".join(f"fits in {name}?" for name in GPU_BYTES) + " |")
    for stage, model, size in PAPER_RUNS:
        parts = estimate_memory(stage, model, size, per_gpu_batch)
        micro = [fitting_micro_batch(stage, model, size, per_gpu_batch, capacity) for capacity in GPU_BYTES.values()]
        fits = ["yes" if m == per_gpu_batch else f"--micro-batch {m}" if m else "no" for m in micro]
        name = f"{'RCM' if stage == 'pretrain' else 'EPG'}-{model}/{models.patch_size_for(model, size)} @{size}"
        print(f"| {stage} | {name} | " + " | ".join(f"{b / 2 ** 30:.1f}" for b in parts.values())
              + f" | {' | '.join(fits)} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=(*STAGES, "all", "data"), default="all",
                   help="which stage to time; data: the data loader's CPU time per sample (no GPU)")
    p.add_argument("--model", default="B", help="model size (T, S, B, L, XL, XXL, G)")
    p.add_argument("--image-size", type=int, default=None, help="none: 256 (32 for T)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step on this device (none: 64; with --memory, images per GPU, none: 128)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on for CUDA)")
    p.add_argument("--record", action="store_true", help="append the results as rows of BENCHMARKS.md")
    p.add_argument("--memory", action="store_true", help="estimate the memory per GPU of the paper's runs (no GPU)")
    args = p.parse_args()
    if args.memory or args.stage == "data":
        torch.set_num_threads(1)
        return memory_report(args.batch_size or 128) if args.memory else data_report()
    args.batch_size = args.batch_size or 64
    args.image_size = args.image_size or (32 if args.model == "T" else 256)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = measure_peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"device: {name}; measured peak {'bf16' if device.type == 'cuda' else 'fp32'} matmul "
          f"{peak / 1e12:.1f} TFLOP/s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = datetime.date.today().isoformat()
    rows = []
    print("stage | model | device | precision | batch | img/s | TFLOP/s | MFU % | peak mem | commit | date")
    for stage in (STAGES if args.stage == "all" else [args.stage]):
        r = bench(stage, args, device, peak)
        row = (f"| {stage} | {args.model}@{args.image_size} | {name} | {precision} | {r['batch']} | "
               f"{r['images_per_s']:.1f} | {r['tflops']:.2f} | {r['mfu']:.1f} | {r['peak_mem_gb']:.1f} GiB | "
               f"{commit} | {date} |")
        print(row, flush=True)
        rows.append(row)
    if args.record:
        with open("BENCHMARKS.md", "a") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
