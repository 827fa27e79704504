"""The whole EPG pipeline at tiny size on the embedded data set, on CPU: what `make demo` runs; and, with
--ablation, Table 6 at small scale.

    pre-train RCM-T -> fine-tune EPG-T as a diffusion model -> fine-tune it further as a consistency model (ECT's
    start from the diffusion model; the paper's start from RCM-T is --ablation's)
    -> sample (Heun-32, one step) -> class accuracy and FD_ref with the embedded data set's reference classifier

Each stage is the real script, its command line printed before it runs, so the demo doubles as a tutorial.
FD_ref is a Frechet distance in the reference classifier's feature space: NOT comparable to Inception FID.

--ablation: fine-tuning from the RCM vs from scratch at equal steps (paper Table 6, ImageNet-256: diffusion FID 41.4
vs 59.7, consistency 33.1 vs NaN), scored by class accuracy, FD_ref, whether training stayed finite, and for
diffusion the held-out eq. 1 loss (Table 9's proposal and weighting on the validation split, noise fixed by a seed),
each as mean (min-max) over --seeds.

--headstart: does the pre-trained encoder give fine-tuning a head start, and does fine-tuning keep it? Diffusion
fine-tunings from RCM-T and from scratch under four schedules (lr 1e-3 constant; lr 1e-3 with a 300-step warm-up and
cosine decay; lr 2.5e-4 with the same; lr 1e-3 with the encoder frozen), all with the same batches and noise; every
--every steps the held-out eq. 1 loss by noise level and the kNN probe of the EMA encoder's [CLS] feature; and how
much of the clean image each starting encoder keeps. Writes headstart.json/.md and headstart.png.

    python demo.py [--out runs/demo] [--quick]
    python demo.py --ablation [--out runs/ablation] [--init RCM_CKPT] [--dm-steps 9600] [--cm-steps 1200] [--seeds 0 1]
    python demo.py --headstart --init RCM_CKPT [--out runs/headstart] [--dm-steps 2400] [--every 200]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw

import data
import losses
import models
import shapes
import trainlib

ROOT = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("rcm", "scratch")
# class accuracy at which the samples are recognisably class-conditional (500 samples; BENCHMARKS.md records the
# figures each make demo run reached)
GOALS = dict(dm=0.6, cm=0.3)


def run(cmds, log, threads=None, stop_on_failure=True):
    """Run one stage, or several independent ones side by side (`threads` CPU threads each), echoing the commands;
    stop the demo with the stage's own message if one fails (unless stop_on_failure=False). Returns exit codes."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0, procs = time.time(), []
    for cmd in cmds:
        print(f"\n$ python {' '.join(cmd[1:])}", flush=True)
        procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT, env=env)))
    for cmd, proc in procs:
        if proc.wait() != 0 and stop_on_failure:
            for _, other in procs:
                other.kill()
            sys.exit(f"demo: stage failed (exit code {proc.returncode}): python {' '.join(cmd[1:])}")
    log += [(" ".join(cmd[1:]), time.time() - t0) for cmd, _ in procs]
    return [proc.returncode for _, proc in procs]


def score(py, npz, log):
    """Class accuracy and FD_ref of a samples.npz (python shapes.py score)."""
    out = os.path.join(os.path.dirname(npz), "metrics.json")
    run([[py, "shapes.py", "score", npz, "--out", out]], log)
    with open(out) as f:
        return json.load(f)


def ema_model(ckpt):
    """(EMA EPG in eval mode, config) of a diffusion checkpoint."""
    state = trainlib.load_checkpoint(ckpt, "diffusion")
    cfg = state["config"]
    model = models.build_epg(cfg["model"], cfg["image_size"], cfg["num_classes"])
    model.load_state_dict(state["ema"])
    return model.eval(), cfg


@torch.no_grad()
def heldout_denoising_loss(ckpt, images=1000, batch=250, seed=0, model=None):
    """Eq. 1 (Table 9 weighting) of the EMA model of a diffusion checkpoint (or of `model`, config) on the first
    `images` validation images. -> dict(loss=weighted mean, per_sigma={bin of the unshifted t_n: unweighted MSE})."""
    model, cfg = model or ema_model(ckpt)
    shift, dataset = losses.resolution_shift(cfg["image_size"]), shapes.EmbeddedShapes("val", cfg["image_size"])
    g, total, bins, edges = torch.Generator().manual_seed(seed), 0.0, {}, [0.0, 0.1, 1.0, 10.0, math.inf]
    for start in range(0, images, batch):
        items = [dataset[i] for i in range(start, min(start + batch, images))]
        x0 = data.normalize(torch.stack([im for im, _ in items]).float() / 255.0, cfg.get("normalize", "simple"))
        y = torch.tensor([label for _, label in items])
        sigma, weight = losses.diffusion_noise(len(items), g, cfg["p_mean"], cfg["p_std"])
        eps = torch.randn(x0.shape, generator=g)
        total += losses.diffusion_loss(model, x0, y, shift * sigma, weight, eps).sum().item()
        mse = losses.diffusion_loss(model, x0, y, shift * sigma, torch.ones_like(weight), eps)
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside, key = (sigma >= lo) & (sigma < hi), f"t in [{lo:g}, {hi:g})"
            n, s = bins.get(key, (0, 0.0))
            bins[key] = (n + int(inside.sum()), s + mse[inside].sum().item())
    return dict(loss=total / images, per_sigma={k: s / n for k, (n, s) in bins.items() if n})


def pipeline(args, py, log):
    out = args.out
    steps = dict(pt=10, dm=10, cm=10, n=20) if args.quick else dict(pt=300, dm=7000, cm=400, n=500)
    quick = dict(pt=["--probe-bank", "200", "--probe-queries", "100"], dm=["--sample-steps", "2"]) if args.quick \
        else dict(pt=[], dm=[])                                       # a smoke test: smaller probe, cheaper grid
    run([[py, "pretrain.py", "--model", "T", "--steps", str(steps["pt"]), *quick["pt"], "--out", f"{out}/pt"]], log)
    init = f"{out}/pt/ckpt_last.pt"
    run([[py, "train_diffusion.py", "--model", "T", "--init", init, "--steps", str(steps["dm"]), "--sample-every", "0",
          "--eval-samples", "0", *quick["dm"], "--out", f"{out}/dm"]], log)
    # the consistency model starts from the diffusion model, as ECT does (the paper: from RCM-T and a fresh decoder,
    # which a CPU's minutes leave at class accuracy 0.22-0.27; BENCHMARKS.md "The tiny presets", README deviation
    # 31); W of eq. 9 is still RCM-T
    run([[py, "train_consistency.py", "--model", "T", "--init", init, "--init-diffusion", f"{out}/dm/ckpt_last.pt",
          "--steps", str(steps["cm"]), "--out", f"{out}/cm"]], log)
    # the tiny diffusion checkpoint records its guidance, CFG 4.0 above the paper's interval (train_diffusion.PRESETS)
    for name, sampler in (("dm", ["--steps", "32"]), ("cm", ["--steps", "1"])):  # one after the other, all cores
        run([[py, "sample.py", "--ckpt", f"{out}/{name}/ckpt_last.pt", "--num-samples", str(steps["n"]), "--labels",
              "balanced", *sampler, "--out", f"{out}/samples_{name}", "--no-progress"]], log)
    metrics = {name: score(py, f"{out}/samples_{name}/samples.npz", log) for name in ("dm", "cm")}
    probes = [json.loads(line) for line in open(f"{out}/pt/metrics.jsonl") if "probe_acc" in line]
    summary = {
        "probe_acc_random_init": probes[0]["probe_acc"], "probe_acc_pretrained": probes[-1]["probe_acc"],
        "diffusion_heun32": metrics["dm"], "consistency_one_step": metrics["cm"], "class_acc_goals": GOALS,
        "note": "fd_ref is a Frechet distance in the embedded data set's reference-classifier feature space, "
                "NOT comparable to Inception FID",
    }
    table = [
        "| what | value |", "|---|---|",
        f"| kNN probe accuracy, random-init encoder | {probes[0]['probe_acc']:.3f} |",
        f"| kNN probe accuracy, pre-trained RCM-T ({steps['pt']} steps) | {probes[-1]['probe_acc']:.3f} |",
        f"| diffusion EPG-T, Heun-32 + CFG 4.0 on (1.61, 80]: class accuracy (goal >= {GOALS['dm']}) | "
        f"{metrics['dm']['class_acc']:.3f} |",
        f"| diffusion EPG-T: FD_ref (not Inception FID) | {metrics['dm']['fd_ref']:.2f} |",
        f"| consistency EPG-T, one step: class accuracy (goal >= {GOALS['cm']}) | {metrics['cm']['class_acc']:.3f} |",
        f"| consistency EPG-T: FD_ref (not Inception FID) | {metrics['cm']['fd_ref']:.2f} |",
        "| chance class accuracy | 0.100 |",
    ]
    return summary, table, f"grids: {out}/samples_dm/grid.png (diffusion), {out}/samples_cm/grid.png (consistency)"


def finetune_pair(args, py, log, init, seed, out):
    """One seed of the ablation: both variants fine-tuned, sampled and scored. Returns {dm_rcm: {...}, ...}."""
    start = {"rcm": ["--init", init], "scratch": ["--from-scratch"]}
    # a fine-tuning that stops (a non-finite loss ends it with exit code 2: Table 6's "NaN") is reported, not fatal
    codes = run([[py, "train_diffusion.py", "--model", "T", *start[v], "--steps", str(args.dm_steps), "--sample-every",
                  "0", "--eval-samples", "0", "--seed", str(seed), "--out", f"{out}/dm_{v}"] for v in VARIANTS],
                log, threads=1, stop_on_failure=False)
    codes += run([[py, "train_consistency.py", "--model", "T", *start[v], "--steps", str(args.cm_steps),
                   "--seed", str(seed), "--out", f"{out}/cm_{v}"] for v in VARIANTS],
                 log, threads=1, stop_on_failure=False)
    finished = {name: code == 0 for name, code in zip([f"{k}_{v}" for k in ("dm", "cm") for v in VARIANTS], codes)}
    guidance = [] if args.cfg_scale is None else ["--cfg-scale", str(args.cfg_scale)]
    for kind, extra in (("dm", ["--steps", "32", *guidance]), ("cm", ["--steps", "1"])):
        cmds = [[py, "sample.py", "--ckpt", f"{out}/{kind}_{v}/ckpt_last.pt", "--num-samples", str(args.num_samples),
                 "--labels", "balanced", *extra, "--out", f"{out}/samples_{kind}_{v}", "--no-progress"]
                for v in VARIANTS if finished[f"{kind}_{v}"]]
        if cmds:
            run(cmds, log, threads=1)
    results = {}
    for name, ok in finished.items():
        results[name] = {"finite": ok, **(score(py, f"{out}/samples_{name}/samples.npz", log) if ok else {})}
        if ok and name.startswith("dm"):
            results[name]["heldout"] = heldout_denoising_loss(f"{out}/{name}/ckpt_last.pt")
    return results


def ablation(args, py, log):
    out, init = args.out, args.init
    if init is None:
        run([[py, "pretrain.py", "--model", "T", "--steps", str(args.pt_steps), "--out", f"{out}/pt"]], log)
        init = f"{out}/pt/ckpt_last.pt"
    per_seed = {seed: finetune_pair(args, py, log, init, seed, f"{out}/seed{seed}") for seed in args.seeds}

    def spread(name, get):  # "mean (min-max)" over the seeds whose run stayed finite
        values = [get(r[name]) for r in per_seed.values() if r[name]["finite"]]
        if not values:
            return "—"
        mean = sum(values) / len(values)
        return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ({min(values):.4g}–{max(values):.4g})"

    rows = ["| fine-tuning | init | steps | seeds finite | held-out eq. 1 loss | held-out MSE by t: [0, 0.1) / "
            "[0.1, 1) / [1, 10) / [10, ∞) | class accuracy | FD_ref (not Inception FID) |",
            "|---|---|---|---|---|---|---|---|"]
    for kind, label, steps in (("dm", "diffusion, Heun-32", args.dm_steps),
                               ("cm", "consistency, 1 step", args.cm_steps)):
        for v in VARIANTS:
            name = f"{kind}_{v}"
            finite = sum(r[name]["finite"] for r in per_seed.values())
            held = bins = "—"
            if kind == "dm":
                held = spread(name, lambda r: r["heldout"]["loss"])
                bins = " / ".join(spread(name, lambda r, k=k: r["heldout"]["per_sigma"].get(k, math.nan))
                                  for k in ("t in [0, 0.1)", "t in [0.1, 1)", "t in [1, 10)", "t in [10, inf)"))
            rows.append(f"| {label} | {'RCM-T' if v == 'rcm' else 'scratch'} | {steps} | {finite}/{len(per_seed)} | "
                        f"{held} | {bins} | {spread(name, lambda r: r['class_acc'])} | "
                        f"{spread(name, lambda r: r['fd_ref'])} |")
    results = {"init": init, "seeds": {str(k): v for k, v in per_seed.items()}}
    return results, rows, f"mean (min–max) over seeds {args.seeds}; grids: {out}/seed*/samples_*/grid.png"


# ----------------------------------------------------------------------------------------------------------------
# --headstart: is the pre-training kept by fine-tuning, and does it help?
# ----------------------------------------------------------------------------------------------------------------
SCHEDULES = {"const": ["--lr", "1e-3", "--lr-schedule", "constant", "--warmup", "0"],
             "warm": ["--lr", "1e-3", "--lr-schedule", "cosine", "--warmup", "300"],
             "gentle": ["--lr", "2.5e-4", "--lr-schedule", "cosine", "--warmup", "300"],
             "frozen": ["--lr", "1e-3", "--lr-schedule", "constant", "--warmup", "0", "--freeze-encoder"]}
ARMS = {f"{init}_{schedule}": flags for schedule, flags in SCHEDULES.items() for init in ("rcm", "scratch")}
COLOURS = {"rcm_const": (31, 90, 200), "scratch_const": (230, 110, 20), "rcm_warm": (0, 160, 180),
           "scratch_warm": (200, 40, 40), "rcm_gentle": (110, 170, 250), "scratch_gentle": (250, 180, 90),
           "rcm_frozen": (20, 40, 90), "scratch_frozen": (130, 60, 10)}


def encoder_probe(image_size, normalize, seed=0):
    """The kNN probe of pretrain.py (2000 bank images, 1000 held-out queries) for an EPG's encoder: its [CLS]
    feature after the final LayerNorm, without the class offset, at s * sigma_min (and sigma = 1 for the noisy one)."""
    shift = losses.resolution_shift(image_size)
    probe = trainlib.KnnProbe(*data.probe_sets(None, image_size, normalize, seed, 2000, 1000),
                              shift * losses.SIGMA_MIN, shift * 1.0)

    def measure(model):
        def features(x, sigma):
            return model.encoder(*losses.precondition(x, torch.full((len(x),), sigma)))[0][:, 0]
        return probe(features)
    return measure


@torch.no_grad()
def pixel_r2(encoder, image_size, normalize, sigmas=(0.05, 0.5, 2.0), images=600, fit=400):
    """How much of the clean image an encoder keeps: R^2 of the clean patches predicted linearly (ridge, fitted on
    `fit` validation images, scored on the rest) from the encoder's final image tokens, at unshifted noise levels."""
    dataset, shift = shapes.EmbeddedShapes("val", image_size), losses.resolution_shift(image_size)
    x = data.normalize(torch.stack([dataset[i][0] for i in range(images)]).float() / 255.0, normalize)
    p = encoder.patch_size
    target = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(images, -1, 3 * p * p)
    result = {}
    for sigma in sigmas:
        noisy = x + shift * sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        tokens = encoder(*losses.precondition(noisy, torch.full((images,), shift * sigma)))[0][:, 2:]
        a = torch.cat([tokens, torch.ones_like(tokens[..., :1])], -1)
        (a_fit, a_test), (y_fit, y_test) = (t.split([fit, images - fit]) for t in (a, target))
        a_fit, y_fit = a_fit.flatten(0, 1), y_fit.flatten(0, 1)
        w = torch.linalg.solve(a_fit.T @ a_fit + 1e-3 * torch.eye(a.shape[-1]), a_fit.T @ y_fit)
        unexplained = ((a_test @ w - y_test) ** 2).sum() / ((y_test - y_fit.mean(0)) ** 2).sum()
        result[sigma] = round(1 - unexplained.item(), 3)
    return result


def start_model(cfg, init, seed):
    """The EMA model of step 0, built as train_diffusion.py builds it (seeded init, the RCM's encoder)."""
    torch.manual_seed(seed)
    model = models.build_epg(cfg["model"], cfg["image_size"], cfg["num_classes"])
    if init:
        models.load_encoder_from_rcm(model, trainlib.load_checkpoint(init, "pretrain")["model"])
    return model.eval()


def headstart(args, py, log):
    out, every, steps = args.out, args.every, args.dm_steps
    for schedule in SCHEDULES:
        start = {"rcm": ["--init", args.init], "scratch": ["--from-scratch"]}
        run([[py, "train_diffusion.py", "--model", "T", *start[arm.split("_")[0]], *ARMS[arm], "--steps",
              str(steps), "--keep-every", str(every), "--ckpt-every", str(every), "--sample-every", "0",
              "--eval-samples", "0", "--seed", str(args.seeds[0]), "--out", f"{out}/{arm}"]
             for arm in (f"rcm_{schedule}", f"scratch_{schedule}")],
            log, threads=1)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = trainlib.load_checkpoint(f"{out}/rcm_const/ckpt_last.pt", "diffusion")["config"]
    probe = encoder_probe(cfg["image_size"], cfg["normalize"])
    results = {}
    for arm in ARMS:
        cached = f"{out}/{arm}/evaluation.json"                   # an evaluated arm is not evaluated again
        if os.path.exists(cached):
            results[arm] = json.load(open(cached))
            continue
        results[arm] = []
        for step in range(0, steps + 1, every):
            model = (start_model(cfg, args.init if arm.startswith("rcm") else None, args.seeds[0]) if step == 0
                     else ema_model(f"{out}/{arm}/ckpt_{step:07d}.pt")[0])
            with torch.no_grad():
                record = {"step": step, **heldout_denoising_loss(None, model=(model, cfg)), **probe(model)}
            results[arm].append(record)
            print(f"{arm} step {step}: held-out loss {record['loss']:.4g}, probe {record['probe_acc']:.3f}", flush=True)
        trainlib.write_json(cached, results[arm])
    r2 = {init: pixel_r2(start_model(cfg, args.init if init == "rcm" else None, args.seeds[0]).encoder,
                         cfg["image_size"], cfg["normalize"]) for init in ("rcm", "scratch")}
    print(f"R^2 of the clean patches from the starting encoder's tokens, by sigma: {r2}", flush=True)
    bins = ("t in [0, 0.1)", "t in [0.1, 1)", "t in [1, 10)", "t in [10, inf)")
    rows = [f"R^2 of the clean patches from the starting encoder's tokens (ridge), by sigma: {r2}", "",
            "| arm | step | held-out eq. 1 loss | MSE t in [0, 0.1) | [0.1, 1) | [1, 10) | [10, ∞) | kNN probe clean "
            "| noisy |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, records in results.items():
        for r in records:
            rows.append(f"| {arm} | {r['step']} | {r['loss']:.4g} | "
                        + " | ".join(f"{r['per_sigma'].get(b, math.nan):.4g}" for b in bins)
                        + f" | {r['probe_acc']:.3f} | {r['probe_acc_noisy']:.3f} |")
    def versus_scratch(key):  # each RCM arm's value relative to the scratch arm of its schedule, in %, from step 200
        return {a: [(r["step"], 100 * (key(r) / key(q) - 1)) for r, q in zip(rs, results["scratch" + a[3:]])
                    if r["step"]] for a, rs in results.items() if a.startswith("rcm")}
    line_plot(f"{out}/headstart.png", [
        ("held-out eq. 1 loss, RCM-T arm vs scratch arm (%)", versus_scratch(lambda r: r["loss"])),
        ("the same at t in [1, 10) (% MSE)", versus_scratch(lambda r: r["per_sigma"][bins[2]])),
        ("kNN probe of the EMA encoder (clean)", {a: [(r["step"], r["probe_acc"]) for r in rs]
                                                   for a, rs in results.items()})], COLOURS)
    results = {"init": args.init, "arms": ARMS, "results": results, "pixel_r2": r2}
    return results, rows, f"curves: {out}/headstart.png"


def line_plot(path, panels, colours, size=(460, 320)):
    """Panels side by side, each (title, {series: [(x, y), ...]}), drawn with PIL; one legend below."""
    w, h = size
    left, right, top, bottom = 58, 12, 24, 34
    image = Image.new("RGB", (w * len(panels), h + 18 * math.ceil(len(colours) / 4) + 8), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, series) in enumerate(panels):
        x0, points = k * w, [p for pts in series.values() for p in pts if math.isfinite(p[1])]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
        to_px = lambda x, y: (x0 + left + (x - min(xs)) / (max(xs) - min(xs) or 1) * (w - left - right),  # noqa: E731
                              top + (hi - y) / (hi - lo) * (h - top - bottom))
        draw.rectangle([x0 + left, top, x0 + w - right, h - bottom], outline=(120, 120, 120))
        draw.text((x0 + left, 6), title, fill="black")
        for i in range(5):
            y = lo + (hi - lo) * i / 4
            _, py_ = to_px(min(xs), y)
            draw.line([x0 + left - 4, py_, x0 + left, py_], fill=(120, 120, 120))
            draw.text((x0 + 4, py_ - 6), f"{y:.3g}", fill="black")
        for x in sorted(set(xs))[::max(1, len(set(xs)) // 6)]:
            px, _ = to_px(x, lo)
            draw.line([px, h - bottom, px, h - bottom + 4], fill=(120, 120, 120))
            draw.text((px - 10, h - bottom + 6), str(x), fill="black")
        draw.text((x0 + w // 2 - 20, h - 14), "step", fill="black")
        if lo < 0 < hi:                                                         # the zero line of a difference
            draw.line([to_px(min(xs), 0), to_px(max(xs), 0)], fill=(170, 170, 170))
        for name, pts in series.items():
            pts = [to_px(x, y) for x, y in pts if math.isfinite(y)]
            draw.line(pts, fill=colours[name], width=2)
            for px, py_ in pts:
                draw.ellipse([px - 2, py_ - 2, px + 2, py_ + 2], fill=colours[name])
    for i, (name, colour) in enumerate(colours.items()):
        x, y = 20 + (i % 4) * 220, h + 4 + 18 * (i // 4)
        draw.line([x, y + 7, x + 24, y + 7], fill=colour, width=3)
        draw.text((x + 30, y), name, fill="black")
    image.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="directory for every output (none: runs/demo or runs/ablation)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test, samples will be poor)")
    p.add_argument("--ablation", action="store_true", help="Table 6 at small scale instead of the pipeline")
    p.add_argument("--headstart", action="store_true", help="the head-start curves instead of the pipeline")
    p.add_argument("--every", type=int, default=200, help="headstart: evaluate every this many steps")
    p.add_argument("--init", default=None, help="ablation: an RCM-T checkpoint to reuse (none: pre-train one)")
    p.add_argument("--pt-steps", type=int, default=300, help="ablation: pre-training steps without --init")
    p.add_argument("--dm-steps", type=int, default=9600, help="ablation: diffusion steps of both variants")
    p.add_argument("--cm-steps", type=int, default=1200, help="ablation: consistency steps of both variants")
    p.add_argument("--num-samples", type=int, default=500, help="ablation: class-balanced samples per model")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="ablation: CFG scale of the diffusion samples (none: the checkpoint's: CFG 4.0 on (1.61, 80])")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="ablation: seeds of the fine-tunings")
    args = p.parse_args()
    mode = "headstart" if args.headstart else "ablation" if args.ablation else "demo"
    if mode == "headstart" and not args.init:
        p.error("--headstart needs --init RCM_CKPT (a pre-trained RCM-T)")
    args.out = args.out or f"runs/{mode}"
    os.makedirs(args.out, exist_ok=True)
    log, t0 = [], time.time()
    results, table, where = {"headstart": headstart, "ablation": ablation, "demo": pipeline}[mode](
        args, sys.executable, log)
    results["stages"] = [{"command": c, "seconds": round(s, 1)} for c, s in log]
    results["total_seconds"] = round(time.time() - t0, 1)
    table.append(f"| total time | {results['total_seconds'] / 60:.1f} min |")
    name = {"headstart": "headstart", "ablation": "results", "demo": "summary"}[mode]
    with open(f"{args.out}/{name}.json", "w") as f:
        json.dump(results, f, indent=2)
    with open(f"{args.out}/{name}.md", "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n" + "\n".join(table) + f"\n\n{where}\nresults: {args.out}/{name}.json, {args.out}/{name}.md")


if __name__ == "__main__":
    main()
