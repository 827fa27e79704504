"""Curves of several runs from their OUT/metrics.jsonl: one panel per metric, one line per run, labelled by run name.

    python tools/curves.py RUN_DIR... [--metric NAME ...] [--x step|images|flops] --out curves.png

Evaluation metrics (class_acc, fd_ref, fid, is, heldout_loss, probe_acc, ...; `--eval-every`) come from the
evaluation records, losses from the log records. --x images: steps x the global batch. --x flops: the training
compute, config.json's train_flops per step plus init_flops, what the pre-training of --init cost, so that a run
fine-tuned from an RCM starts where its pre-training ended: a head start per step that vanishes per FLOP shows.
"""
import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import rundir  # noqa: E402

PREFERRED = ("class_acc", "fd_ref", "fid", "is", "heldout_loss", "probe_acc", "loss")
X_LABELS = {"step": "training step", "images": "training images", "flops": "training FLOPs (pre-training included)"}


def read_run(folder):
    """(config, records) of a run directory; lines that do not parse (a write cut short) are skipped."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise rundir.UserError(f"'{folder}' holds no metrics.jsonl: pass the --out directories of training runs")
    records = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    config = {}
    if os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    return config, records


def compute(config):
    """(FLOPs per training step, FLOPs before step 0) of a run: recorded, else counted from its config (and the
    checkpoint of its --init for what the pre-training cost)."""
    per_step = config.get("train_flops") or config["batch_size"] * models.train_flops_per_image(
        config["stage"], config["model"], config["image_size"])
    before = config.get("init_flops") or 0
    if not before and config.get("init") and config.get("stage") != "pretrain":
        rcm = rundir.load_checkpoint(config["init"], "pretrain", mmap=True)
        before = rcm["step"] * (rcm["config"].get("train_flops") or rcm["config"]["batch_size"]
                                * models.train_flops_per_image("pretrain", rcm["config"]["model"],
                                                               rcm["config"]["image_size"]))
    return per_step, before


def series(config, records, metric, x="step"):
    """[(x, value)] of `metric`, one point per step (the last record of a step wins), in step order."""
    points = {r["step"]: r[metric] for r in records if isinstance(r.get(metric), (int, float))}
    if x == "images":
        scale, offset = config["batch_size"], 0
    elif x == "flops":
        scale, offset = compute(config)
    else:
        scale, offset = 1, 0
    return [(offset + step * scale, value) for step, value in sorted(points.items()) if math.isfinite(value)]


def plot(runs, metrics, x="step"):
    """A matplotlib figure: one panel per metric, one line per run ({name: (config, records)})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    for ax, metric in zip(axes.flat, metrics):
        for k, (name, (config, records)) in enumerate(runs.items()):
            points = series(config, records, metric, x)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name, color=colours(k))
        ax.set_title(metric)
        ax.set_xlabel(X_LABELS[x])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out directories of training runs")
    p.add_argument("--metric", nargs="+", default=None,
                   help=f"metrics to draw (default: those of {', '.join(PREFERRED)} that the runs log)")
    p.add_argument("--x", choices=tuple(X_LABELS), default="step", help="the horizontal axis")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args(argv)
    runs = {os.path.basename(os.path.normpath(folder)): read_run(folder) for folder in args.runs}
    logged = {key for _, records in runs.values() for r in records for key, v in r.items()
              if isinstance(v, (int, float)) and key != "step"}
    metrics = args.metric or [m for m in PREFERRED if m in logged]
    missing = [m for m in metrics if m not in logged]
    if missing or not metrics:
        raise rundir.UserError(f"no run logs {', '.join(missing) or 'any metric'}; these do: "
                               f"{', '.join(sorted(logged))}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise rundir.UserError(f"the folder of --out {args.out} does not exist")
    fig = plot(runs, metrics, args.x)
    rundir.write_atomically(args.out, lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"wrote {args.out}: {len(metrics)} panels ({', '.join(metrics)}), {len(runs)} runs, x = {args.x}")


if __name__ == "__main__":
    rundir.cli_main(main)
