"""The whole EPG pipeline at tiny size on the embedded data set, on CPU: what `make demo` runs.

    pre-train RCM-T -> fine-tune EPG-T as a diffusion model -> fine-tune EPG-T as a consistency model
    -> sample (Heun-32, one-step) -> metrics with the embedded data set's reference classifier

Each stage is the real script with the command line printed before it runs, so the demo doubles as a tutorial.
Outputs go to runs/demo/ (grids: samples_dm/grid.png, samples_cm/grid.png; metrics: summary.json, summary.md).
The Fréchet distance here is measured in the reference classifier's feature space: it is NOT comparable to
Inception FID (no Inception weights and no ImageNet exist offline).

    python demo.py [--out runs/demo] [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(cmds, log, threads=None, stop_on_failure=True):
    """Run one stage, or several independent ones side by side (one CPU thread each), echoing the commands; stop
    the demo with the stage's own message if one fails (or, with stop_on_failure=False, let the others finish).
    Returns the exit codes."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.time()
    procs = []
    for cmd in cmds:
        print(f"\n$ python {' '.join(cmd[1:])}", flush=True)
        procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT, env=env)))
    for cmd, proc in procs:
        if proc.wait() != 0 and stop_on_failure:
            for _, other in procs:
                other.kill()
            sys.exit(f"demo: stage failed (exit code {proc.returncode}): python {' '.join(cmd[1:])}")
    for cmd, _ in procs:
        log.append((" ".join(cmd[1:]), time.time() - t0))
    return [proc.returncode for _, proc in procs]


def last_probe(metrics_path):
    """The last kNN probe record of a pretrain.py metrics.jsonl (and the first, at random initialisation)."""
    probes = []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "probe_acc" in record:
                probes.append(record)
    return probes[0], probes[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for every output of the demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (a smoke test, samples will be poor)")
    args = p.parse_args()
    out = args.out
    py = sys.executable
    steps = dict(pt=10, dm=10, cm=10, n=20) if args.quick else dict(pt=300, dm=1200, cm=600, n=200)
    log, t_start = [], time.time()

    run([[py, "pretrain.py", "--model", "T", "--steps", str(steps["pt"]), "--out", f"{out}/pt"]], log)
    init = f"{out}/pt/ckpt_last.pt"
    # the two fine-tunings are independent: run them side by side, one thread each (2 cores)
    run([[py, "train_diffusion.py", "--model", "T", "--init", init, "--steps", str(steps["dm"]), "--sample-every", "0",
          "--eval-samples", "0", "--out", f"{out}/dm"],
         [py, "train_consistency.py", "--model", "T", "--init", init, "--steps", str(steps["cm"]),
          "--out", f"{out}/cm"]], log, threads=1)
    # a short tiny run needs guidance at every noise level to show its classes: CFG 4.0 on the whole range
    # (the paper's interval (0.19, 1.61] guides only the fine detail; at 2400 steps it gives class accuracy 0.14 vs 0.32)
    run([[py, "sample.py", "--ckpt", f"{out}/dm/ckpt_last.pt", "--num-samples", str(steps["n"]), "--labels",
          "balanced", "--steps", "32", "--cfg-scale", "4.0", "--cfg-interval", "0", "80", "--out", f"{out}/samples_dm",
          "--no-progress"],
         [py, "sample.py", "--ckpt", f"{out}/cm/ckpt_last.pt", "--num-samples", str(steps["n"]), "--labels",
          "balanced", "--steps", "1", "--out", f"{out}/samples_cm", "--no-progress"]], log, threads=1)
    # the reference classifier is trained once and cached, so the two evaluations run one after the other
    for name in ("dm", "cm"):
        run([[py, "fid.py", f"{out}/samples_{name}/samples.npz", "--embedded", "--no-progress", "--out",
              f"{out}/samples_{name}/metrics.json"]], log)

    first, last = last_probe(f"{out}/pt/metrics.jsonl")
    metrics = {name: json.load(open(f"{out}/samples_{name}/metrics.json")) for name in ("dm", "cm")}
    summary = {
        "probe_acc_random_init": first["probe_acc"], "probe_acc_pretrained": last["probe_acc"],
        "diffusion_heun32": metrics["dm"], "consistency_one_step": metrics["cm"],
        "note": "fd_ref is a Frechet distance in the embedded data set's reference-classifier feature space, "
                "NOT comparable to Inception FID",
        "stages": [{"command": c, "seconds": round(s, 1)} for c, s in log],
        "total_seconds": round(time.time() - t_start, 1),
    }
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    table = [
        "| what | value |", "|---|---|",
        f"| kNN probe accuracy, random-init encoder | {first['probe_acc']:.3f} |",
        f"| kNN probe accuracy, pre-trained RCM-T ({steps['pt']} steps) | {last['probe_acc']:.3f} |",
        f"| diffusion EPG-T, Heun-32 + CFG 4.0 (all noise levels): class accuracy | {metrics['dm']['class_acc']:.3f} |",
        f"| diffusion EPG-T: FD_ref (not Inception FID) | {metrics['dm']['fd_ref']:.2f} |",
        f"| consistency EPG-T, one step: class accuracy | {metrics['cm']['class_acc']:.3f} |",
        f"| consistency EPG-T: FD_ref (not Inception FID) | {metrics['cm']['fd_ref']:.2f} |",
        f"| chance class accuracy | 0.100 |",
        f"| total time | {summary['total_seconds'] / 60:.1f} min |",
    ]
    with open(f"{out}/summary.md", "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\nsample grids: {out}/samples_dm/grid.png (diffusion), {out}/samples_cm/grid.png (consistency)")
    print(f"metrics: {out}/summary.json, {out}/summary.md")


if __name__ == "__main__":
    main()
