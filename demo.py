"""The whole EPG pipeline at tiny size on the embedded data set, on CPU: what `make demo` runs.

    pre-train RCM-T -> fine-tune EPG-T as a diffusion model -> fine-tune it further as a consistency model (ECT's
    start from the diffusion model; the paper's start from RCM-T is train_consistency.py's default)
    -> sample (Heun-16, one step) -> class accuracy and FD_ref with the embedded data set's reference classifier

Each stage is the real script, its command line printed before it runs, so the demo doubles as a tutorial.
FD_ref is a Frechet distance in the reference classifier's feature space: NOT comparable to Inception FID.

    python demo.py [--out runs/demo] [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
# class accuracy at which the samples are recognisably class-conditional (500 samples; BENCHMARKS.md records the
# figures each make demo run reached)
GOALS = dict(dm=0.6, cm=0.3)


def run(cmd, log):
    """Run one stage, echoing its command; stop the demo with the stage's own message if it fails."""
    print(f"\n$ python {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"demo: stage failed: python {' '.join(cmd[1:])}")
    log.append((" ".join(cmd[1:]), time.time() - t0))


def score(py, npz, log):
    """Class accuracy and FD_ref of a samples.npz (python evaluate.py score)."""
    out = os.path.join(os.path.dirname(npz), "metrics.json")
    run([py, "evaluate.py", "score", npz, "--out", out], log)
    with open(out) as f:
        return json.load(f)


def pipeline(args, py, log):
    out = args.out
    if args.quick:        # a smoke test: a few steps, a smaller probe and batches, a cheaper grid
        steps = dict(pt=10, dm=10, cooldown=5, cm=10, n=20)
        quick = dict(pt=["--probe-bank", "200", "--probe-queries", "100", "--batch-size", "8"],
                     dm=["--sample-steps", "2"], cm=["--batch-size", "8"])
    else:
        steps, quick = dict(pt=300, dm=6000, cooldown=1000, cm=300, n=500), dict(pt=[], dm=[], cm=[])
    # pre-training: the kNN probe of the encoder at step 0 and at the end
    run([py, "pretrain.py", "--model", "T", "--steps", str(steps["pt"]), "--probe-every", str(steps["pt"]),
         *quick["pt"], "--out", f"{out}/pt"], log)
    init = f"{out}/pt/ckpt_last.pt"
    # the T preset's constant lr, cooled down to 0 over the last 1000 steps: 6000 steps score as 7000 constant ones
    run([py, "train_diffusion.py", "--model", "T", "--init", init, "--steps", str(steps["dm"]), "--cooldown",
         str(steps["cooldown"]), "--sample-every", "0", "--eval-samples", "0", *quick["dm"], "--out", f"{out}/dm"], log)
    # the consistency model starts from the diffusion model, as ECT does (the paper: from RCM-T and a fresh decoder,
    # which a CPU's minutes leave at class accuracy 0.22-0.27; BENCHMARKS.md "The tiny presets", README deviation
    # 31); W of eq. 9 is still RCM-T
    run([py, "train_consistency.py", "--model", "T", "--init", init, "--init-diffusion", f"{out}/dm/ckpt_last.pt",
         "--steps", str(steps["cm"]), "--eval-samples", "0", *quick["cm"], "--out", f"{out}/cm"], log)
    # diffusion: Heun-16, which scores as Heun-32 does on this model at half its cost (BENCHMARKS.md "make demo"),
    # with the guidance the tiny checkpoint records (CFG 4.0 above the paper's interval: train_diffusion.PRESETS)
    for name, sampler in (("dm", ["--steps", "16"]), ("cm", ["--steps", "1"])):
        run([py, "sample.py", "--ckpt", f"{out}/{name}/ckpt_last.pt", "--num-samples", str(steps["n"]), "--labels",
             "balanced", *sampler, "--out", f"{out}/samples_{name}", "--no-progress"], log)
    metrics = {name: score(py, f"{out}/samples_{name}/samples.npz", log) for name in ("dm", "cm")}
    probes = [json.loads(line) for line in open(f"{out}/pt/metrics.jsonl") if "probe_acc" in line]
    summary = {
        "probe_acc_random_init": probes[0]["probe_acc"], "probe_acc_pretrained": probes[-1]["probe_acc"],
        "diffusion_heun16": metrics["dm"], "consistency_one_step": metrics["cm"], "class_acc_goals": GOALS,
        "note": "fd_ref is a Frechet distance in the embedded data set's reference-classifier feature space, "
                "NOT comparable to Inception FID",
    }
    table = [
        "| what | value |", "|---|---|",
        f"| kNN probe accuracy, random-init encoder | {probes[0]['probe_acc']:.3f} |",
        f"| kNN probe accuracy, pre-trained RCM-T ({steps['pt']} steps) | {probes[-1]['probe_acc']:.3f} |",
        f"| diffusion EPG-T, Heun-16 + CFG 4.0 on (1.61, 80]: class accuracy (goal >= {GOALS['dm']}) | "
        f"{metrics['dm']['class_acc']:.3f} |",
        f"| diffusion EPG-T: FD_ref (not Inception FID) | {metrics['dm']['fd_ref']:.2f} |",
        f"| consistency EPG-T, one step: class accuracy (goal >= {GOALS['cm']}) | {metrics['cm']['class_acc']:.3f} |",
        f"| consistency EPG-T: FD_ref (not Inception FID) | {metrics['cm']['fd_ref']:.2f} |",
        "| chance class accuracy | 0.100 |",
    ]
    return summary, table, f"grids: {out}/samples_dm/grid.png (diffusion), {out}/samples_cm/grid.png (consistency)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for every output (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test, samples will be poor)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log, t0 = [], time.time()
    summary, table, where = pipeline(args, sys.executable, log)
    summary["stages"] = [{"command": c, "seconds": round(s, 1)} for c, s in log]
    summary["total_seconds"] = round(time.time() - t0, 1)
    table.append(f"| total time | {summary['total_seconds'] / 60:.1f} min |")
    with open(f"{args.out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(f"{args.out}/summary.md", "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n" + "\n".join(table) + f"\n\n{where}\nresults: {args.out}/summary.json, {args.out}/summary.md")


if __name__ == "__main__":
    main()
