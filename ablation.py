"""Table 6 at small scale: fine-tuning from RCM pre-training vs from scratch, at equal fine-tuning steps.

    pre-train RCM-T (or reuse --init) -> for each of {RCM init, --from-scratch}:
        diffusion fine-tuning   -> held-out denoising loss (eq. 1) + Heun-32 samples -> FD_ref, class accuracy
        consistency fine-tuning -> held-out consistency loss is not defined without a target, so: one-step samples
                                   -> FD_ref, class accuracy; and whether training stayed finite (Table 6: "NaN")

Paper (ImageNet-256, Table 6): diffusion FID 41.4 (RCM) vs 59.7 (scratch); consistency 33.1 vs NaN.
Every run is the real script (its command line is printed); each pair runs side by side, one CPU thread each.
FD_ref is a Frechet distance in the embedded data set's reference-classifier feature space: NOT Inception FID.
The held-out denoising loss is eq. 1 with Table 9's noise proposal and weighting on the validation split, with
noise fixed by a seed, so both runs are scored on identical (image, noise level, noise) triples.

    python ablation.py [--out runs/ablation] [--init RCM_CKPT] [--dm-steps 2400] [--cm-steps 1200]
Writes OUT/results.json and OUT/results.md (the table README quotes) and the sample grids OUT/samples_*/grid.png.
"""
import argparse
import json
import math
import sys

import torch

import data
import demo
import losses
import sample

VARIANTS = ("rcm", "scratch")


@torch.no_grad()
def heldout_denoising_loss(ckpt, images=1000, batch=250, seed=0):
    """Eq. 1 (Table 9 weighting) of the EMA model of a diffusion checkpoint on the first `images` validation images.

    Returns dict(loss=weighted mean, per_sigma={bin: unweighted MSE}) with bins of the unshifted t_n."""
    model, cfg, _, _ = sample.load_generator(ckpt, "ema")
    size, shift = cfg["image_size"], losses.resolution_shift(cfg["image_size"])
    dataset = data.EmbeddedShapes("val", size)
    g = torch.Generator().manual_seed(seed)
    total, bins = 0.0, {}
    edges = [0.0, 0.1, 1.0, 10.0, math.inf]
    for start in range(0, images, batch):
        items = [dataset[i] for i in range(start, min(start + batch, images))]
        x0 = data.normalize(torch.stack([im for im, _ in items]).float() / 255.0, cfg.get("normalize", "simple"))
        y = torch.tensor([label for _, label in items])
        sigma, weight = losses.diffusion_noise(len(items), g, cfg["p_mean"], cfg["p_std"], cfg["num_scales"])
        eps = torch.randn(x0.shape, generator=g)
        sigma_shifted = shift * sigma
        pred = losses.denoise(model, x0 + sigma_shifted.view(-1, 1, 1, 1) * eps, sigma_shifted, y)
        total += losses.diffusion_loss(pred, x0, weight).sum().item()
        mse = (pred - x0).pow(2).flatten(1).mean(1)
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (sigma >= lo) & (sigma < hi)
            key = f"t in [{lo:g}, {hi:g})"
            n, s = bins.get(key, (0, 0.0))
            bins[key] = (n + int(inside.sum()), s + mse[inside].sum().item())
    return dict(loss=total / images, per_sigma={k: s / n for k, (n, s) in bins.items() if n})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="directory for every output")
    p.add_argument("--init", default=None, help="an RCM-T checkpoint to reuse (default: pre-train one, 300 steps)")
    p.add_argument("--pt-steps", type=int, default=300, help="pre-training steps when --init is not given")
    p.add_argument("--dm-steps", type=int, default=2400, help="diffusion fine-tuning steps of both variants")
    p.add_argument("--cm-steps", type=int, default=1200, help="consistency fine-tuning steps of both variants")
    p.add_argument("--num-samples", type=int, default=500, help="class-balanced samples per model for the metrics")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="interval-CFG scale of the diffusion samples")
    args = p.parse_args()
    out, py, log = args.out, sys.executable, []

    init = args.init
    if init is None:
        demo.run([[py, "pretrain.py", "--model", "T", "--steps", str(args.pt_steps), "--out", f"{out}/pt"]], log)
        init = f"{out}/pt/ckpt_last.pt"
    start = {"rcm": ["--init", init], "scratch": ["--from-scratch"]}

    # A fine-tuning that stops (a non-finite loss ends it with exit code 2: Table 6's "NaN") is reported, not fatal.
    codes = demo.run([[py, "train_diffusion.py", "--model", "T", *start[v], "--steps", str(args.dm_steps),
                       "--sample-every", "0", "--eval-samples", "0", "--out", f"{out}/dm_{v}"] for v in VARIANTS],
                     log, threads=1, stop_on_failure=False)
    codes += demo.run([[py, "train_consistency.py", "--model", "T", *start[v], "--steps", str(args.cm_steps),
                        "--out", f"{out}/cm_{v}"] for v in VARIANTS], log, threads=1, stop_on_failure=False)
    finished = {name: code == 0 for name, code in zip([f"{k}_{v}" for k in ("dm", "cm") for v in VARIANTS], codes)}
    n = str(args.num_samples)
    for kind, extra in (("dm", ["--steps", "32", "--cfg-scale", str(args.cfg_scale)]), ("cm", ["--steps", "1"])):
        cmds = [[py, "sample.py", "--ckpt", f"{out}/{kind}_{v}/ckpt_last.pt", "--num-samples", n, "--labels",
                 "balanced", *extra, "--out", f"{out}/samples_{kind}_{v}", "--no-progress"]
                for v in VARIANTS if finished[f"{kind}_{v}"]]
        if cmds:
            demo.run(cmds, log, threads=1)
    results = {}
    for name, ok in finished.items():
        results[name] = {"finite": ok}
        if not ok:
            continue
        demo.run([[py, "fid.py", f"{out}/samples_{name}/samples.npz", "--embedded", "--no-progress", "--out",
                   f"{out}/samples_{name}/metrics.json"]], log)
        with open(f"{out}/samples_{name}/metrics.json") as f:
            results[name].update(json.load(f))
        if name.startswith("dm"):
            results[name]["heldout"] = heldout_denoising_loss(f"{out}/{name}/ckpt_last.pt")

    rows = ["| fine-tuning | init | steps | held-out eq. 1 loss | class accuracy | FD_ref (not Inception FID) | "
            "finite |", "|---|---|---|---|---|---|---|"]
    for kind, label, steps in (("dm", "diffusion, Heun-32 + CFG", args.dm_steps), ("cm", "consistency, 1 step",
                                                                                   args.cm_steps)):
        for v in VARIANTS:
            r, init = results[f"{kind}_{v}"], "RCM-T" if v == "rcm" else "scratch"
            if not r["finite"]:
                rows.append(f"| {label} | {init} | {steps} | — | — | — | stopped (see {out}/{kind}_{v}) |")
                continue
            held = f"{r['heldout']['loss']:.4f}" if "heldout" in r else "—"
            rows.append(f"| {label} | {init} | {steps} | {held} | {r['class_acc']:.3f} | {r['fd_ref']:.1f} | yes |")
    results["stages"] = [{"command": c, "seconds": round(s, 1)} for c, s in log]
    with open(f"{out}/results.json", "w") as f:
        json.dump(results, f, indent=2)
    with open(f"{out}/results.md", "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n" + "\n".join(rows))
    print(f"\nresults: {out}/results.json, {out}/results.md; grids: {out}/samples_*/grid.png")


if __name__ == "__main__":
    main()
