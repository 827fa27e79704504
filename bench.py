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

    python bench.py --stage diffusion --model XL --batch-size 64                    # one H100/H200
    python bench.py --stage all --model T --device cpu --batch-size 8 --iters 3     # CPU smoke run
    python bench.py ... --record                                                    # append rows to BENCHMARKS.md
"""
import argparse
import copy
import datetime
import subprocess
import time

import torch

import losses
import models
import trainlib


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="which stage to time")
    p.add_argument("--model", default="B", help="model size (T, S, B, L, XL, XXL, G)")
    p.add_argument("--image-size", type=int, default=None, help="none: 256 (32 for T)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step on this device")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (default: on for CUDA)")
    p.add_argument("--record", action="store_true", help="append the results as rows of BENCHMARKS.md")
    args = p.parse_args()
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
