"""`make gpu-check`: one short run that proves the GPU path end to end on one H100/H200 (target: under 8 minutes,
most of it torch.compile of the paper-size models; not yet timed on a GPU). Phases (--only picks some):

  tests  python -m pytest -q tests/test_gpu.py (bf16, compile against eager, flash attention, no host syncs).
  train  a real run of each stage at paper size on the embedded data set with the scripts' CUDA defaults (bf16,
         torch.compile), 30 steps of a per-GPU batch of 64, --log-every 1: RCM-B/16 pre-training; EPG-XL/16 diffusion
         from it (XL takes B's encoder); EPG-L/16 consistency from an RCM-L/16 of a 2-step eager pre-training. A run
         passes when it exits 0, its logged losses are finite, OUT/ckpt_last.pt holds the last step and (on CUDA;
         6 tiny CPU steps are too noisy) the mean of the last third of the losses is below that of the first third.
         Resume is checked where it is cheapest, on pre-training (a 1.7 GB checkpoint, graphs already in the compile
         cache; EPG-XL's is 9 GB): rerunning the finished command must say "nothing to do", and the command on a new
         OUT holding only the run's mid-run checkpoint (--keep-every, copied to ckpt_last.pt) must resume there and
         log the same losses to 1e-2 relative (bitwise on CPU; flash attention's backward is not deterministic).
         Extending constant-lr diffusion with a larger --steps is tested on CPU (tests/test_reliability.py).
  bench  bench.py's four speed rows (pretrain B, diffusion XL, consistency L, sampling XL, at the per-GPU batch),
         appended to BENCHMARKS.md (--record). When bench.py has --memory (a CPU estimate, run beside the GPU
         phases), each measured peak is compared with the "total" of its table for the same run and per-GPU batch
         (none: skipped); measured / estimate outside [0.67, 1.5] fails.
  ddp    with 2 GPUs or more: 3 eager steps of RCM-B pre-training on 2 processes (torchrun, NCCL, SyncBatchNorm) log
         the same losses as on one, to 1e-3 relative, at the same global batch.

Prints a table (check, result, seconds, detail) and exits 1 if a check failed. Every command has a timeout, --budget
bounds the whole run (a check it leaves no time for fails as not run), a failing command's last 30 lines are shown,
and every output is in OUT/<check>.log (OUT is kept after a failure). --device cpu (the default without CUDA) runs
the same at tiny size: --model T, 6 steps, one thread, no compile, bench.py's rows from one process, no memory
comparison, ddp on 2 gloo processes, nothing recorded.

    make gpu-check                            # = python tools/gpu_check.py
    python tools/gpu_check.py --budget 540          # end within 9 minutes, whatever is left to run
    python tools/gpu_check.py --only bench ddp      # some phases
    python tools/gpu_check.py --device cpu          # tiny, on CPU, about a minute
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import trainlib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))        # the repository root
PHASES = ("tests", "train", "bench", "ddp")
SPEED_ROWS = (("pretrain", "B"), ("diffusion", "XL"), ("consistency", "L"), ("sampling", "XL"))


class Failed(Exception):
    """A check's verdict, with its reason."""


def fail(reason):
    raise Failed(reason)


class Checks:
    """Runs `python ...` commands in the repository root and keeps one summary row per check."""

    def __init__(self, cuda, out, budget):
        self.rows, self.bench_rows, self.out, self.deadline = [], [], out, time.time() + (budget or math.inf)
        tiny = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # 1 thread:
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if cuda else tiny)}   # 4x faster on shared cores

    def start(self, name, cmd, **env):
        """Start `python cmd...`, its stdout and stderr going to OUT/<name>.log."""
        log = open(os.path.join(self.out, re.sub(r"\W+", "_", name).strip("_") + ".log"), "w+", encoding="utf-8",
                   errors="replace")
        log.write(f"$ python {' '.join(map(str, cmd))}\n")
        log.flush()
        return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env={**self.env, **env}, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0), log

    def finish(self, name, started, timeout, judge=lambda output: ""):
        """Wait for a started command; the check passes when it exits 0 and judge(output) returns a detail."""
        (proc, log), t0 = started, time.time()
        try:
            code = proc.wait(max(1, min(timeout, self.deadline - t0)))
        except BaseException as e:              # the timeout, Ctrl-C, SIGTERM: stop the command's process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)                  # torchrun passes it on to its workers
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(15)
                os.killpg(proc.pid, signal.SIGKILL)
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            code = None
        log.seek(0)
        output = log.read()
        log.close()
        try:
            if code != 0:
                raise Failed(f"exit code {code}" if code is not None else
                             f"stopped after {time.time() - t0:.0f} s (its timeout of {timeout} s, or --budget)")
            ok, detail = True, judge(output)
        except (Failed, OSError, ValueError, KeyError, IndexError, trainlib.UserError) as e:
            ok, detail = False, str(e) or type(e).__name__
        self.add(name, "ok" if ok else "FAIL", time.time() - t0, detail, None if ok else output)
        return ok, output

    def __call__(self, name, cmd, timeout, judge=lambda output: "", needs=None):
        """One check, unless the time budget is spent (a failure: the GPU path is not proven) or the file `needs`
        is missing (skipped: what should have written it failed)."""
        if self.deadline - time.time() < 30 or needs and not os.path.isfile(needs):
            spent = self.deadline - time.time() < 30
            self.add(name, "FAIL" if spent else "skip", 0, "not run: " + ("--budget spent" if spent else f"no {needs}"))
            return False, ""
        return self.finish(name, self.start(name, cmd), timeout, judge)

    def add(self, name, result, seconds, detail, output=None):
        self.rows.append((name, result, seconds, detail))
        print(f"[{result}] {name} ({seconds:.0f} s): {detail}", flush=True)
        if output:
            print("    | " + "\n    | ".join(re.split(r"[\r\n]+", output.strip())[-30:]), flush=True)


def logged(out):
    """{step: record} of the lines of OUT/metrics.jsonl that carry a training loss."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, filter(str.strip, f)) if "loss" in r}


def judge_run(out, steps, trend=True, resumed_at=0):
    """A finished run: a checkpoint at `steps`, one finite loss logged per step after `resumed_at` (which the run
    must say it resumed from), and with `trend` a mean loss of the last third below that of the first third."""
    def judge(output):
        records = logged(out)
        loss, k = [r["loss"] for r in records.values()], len(records) // 3
        step = trainlib.load_checkpoint(os.path.join(out, "ckpt_last.pt"), mmap=True)["step"]
        if step != steps or list(records) != list(range(resumed_at + 1, steps + 1)):
            raise Failed(f"checkpoint at step {step}, losses logged at {list(records)}; expected {steps}, "
                         f"{resumed_at + 1}..{steps}")
        if not all(map(math.isfinite, loss)):
            raise Failed(f"non-finite logged losses: {loss}")
        if resumed_at and not re.search(rf"resumed from .* at step {resumed_at}\b", output):
            raise Failed(f"it did not say 'resumed from ... at step {resumed_at}'")
        detail = f"{len(loss)} losses logged"
        if k:
            first, last = sum(loss[:k]) / k, sum(loss[-k:]) / k
            if trend and not last < first:
                raise Failed(f"the loss did not fall: mean {first:.5g} over the first third, {last:.5g} over the last")
            detail = (f"loss {first:.4g} -> {last:.4g} (means of the first and last third"
                      + ("" if trend else ", not required") + ")")
        peak = records[steps].get("peak_mem_gb", records[steps].get("peak_memory_gb"))
        return (f"{detail}, checkpoint at step {step}, {records[steps]['images_per_s']:.0f} img/s"
                + (f", peak {peak:.1f} GiB" if peak else ""))
    return judge


def judge_same_losses(reference, out, tolerance):
    """Every loss logged in `out` is the one `reference` logged at that step, to `tolerance` relative."""
    def judge(output):
        ref, new = logged(reference), logged(out)
        if not new or not new.keys() <= ref.keys():
            raise Failed(f"steps {list(new)} are not among the reference's {list(ref)}")
        diff = max(abs(new[s]["loss"] / ref[s]["loss"] - 1) for s in new)
        if not diff <= tolerance:
            raise Failed(f"the losses differ by {diff:.2e} relative (more than {tolerance:g})")
        return f"{len(new)} logged losses agree to {diff:.1e} relative"
    return judge


def judge_bench(checks):
    """bench.py's result rows, kept for the summary and the memory comparison."""
    def judge(output):
        rows = [line for line in output.splitlines() if line.startswith("| ")]
        if not rows:
            raise Failed("bench.py printed no result row")
        checks.bench_rows += rows
        cols = [[c.strip() for c in row.split("|")] for row in rows]
        return "; ".join(f"{c[1]} {c[2]}: {c[6]} img/s, MFU {c[8]} %, peak {c[9]}" for c in cols)
    return judge


def memory_table(text):
    """bench.py --memory's table -> ({(stage, run): total GiB}, per-GPU batch). Its format: a line "... at N images
    per GPU ...", a header row with a column "total", then one row per run: | diffusion | EPG-XL/16 @256 | ... |."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    batch = re.search(r"at (\d+) images per GPU", text)
    if not rows or "total" not in rows[0] or not batch:
        raise Failed("bench.py --memory printed no table with a 'total' column 'at N images per GPU'")
    return {(r[0], r[1]): float(r[rows[0].index("total")]) for r in rows[1:]}, int(batch.group(1))


def compare_memory(checks, estimates, estimated_batch, batch):
    """One row per bench.py row: its measured peak memory against the estimate of the same run."""
    for row in checks.bench_rows:
        cols = [c.strip() for c in row.split("|")]
        stage, (model, size), peak = cols[1], cols[2].split("@"), float(cols[9].split()[0])
        match = [gib for (s, run), gib in estimates.items() if s == stage and f"-{model}/" in run
                 and run.endswith(f"@{size}")]
        if not match or estimated_batch != batch:
            checks.add(f"memory {stage} {model}", "skip", 0, f"bench.py --memory has no estimate for {stage} "
                       f"{model}@{size} at {batch} images per GPU" + (f" (only at {estimated_batch})" if match else ""))
        else:
            ratio = peak / match[0]
            checks.add(f"memory {stage} {model}", "ok" if 0.67 <= ratio <= 1.5 else "FAIL", 0, f"measured {peak:.1f} "
                       f"GiB / estimate {match[0]:.1f} GiB = {ratio:.2f} (ok in [0.67, 1.5])")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda: paper sizes, bf16, compile; cpu: tiny sizes (default: cuda when available)")
    p.add_argument("--only", nargs="+", choices=PHASES, default=PHASES, help="run these phases only")
    p.add_argument("--steps", type=int, default=None, help="steps of each training run (default: 30 on CUDA, 6 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (a time-boxed machine):"
                   " a command still running then is stopped, and later ones fail as not run")
    p.add_argument("--out", default=None, help="directory of every run and log (default: a temporary one, removed "
                                               "at the end when every check passed)")
    p.add_argument("--no-record", action="store_true", help="do not append the speed rows to BENCHMARKS.md")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))             # so that the running command is stopped too
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but no CUDA device is available")
    n, batch = args.steps or (30 if cuda else 6), args.batch_size or (64 if cuda else 8)
    if n < 4 or batch < 2 or batch % 2:
        sys.exit("gpu_check: --steps must be >= 4 and --batch-size an even number >= 2")
    out = args.out or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(out, exist_ok=True)
    size = (lambda model: model) if cuda else (lambda model: "T")     # on CPU every model is the tiny T
    device = [] if cuda else ["--device", "cpu"]
    common = ["--batch-size", batch, "--log-every", 1, *device]
    check, t0 = Checks(cuda, out, args.budget), time.time()
    print(f"gpu_check on {f'{torch.cuda.device_count()} CUDA device(s)' if cuda else 'CPU'}: {' '.join(args.only)}, "
          f"{n} steps, batch {batch}, output in {out}", flush=True)          # (no CUDA context in this process)
    with open(os.path.join(ROOT, "tools", "bench.py")) as f:
        estimator = None                        # bench.py --memory works on the CPU: it runs beside the GPU phases
        if cuda and "bench" in args.only and '"--memory"' in f.read():
            estimator = check.start("bench.py --memory", ["tools/bench.py", "--memory", "--batch-size", batch],
                                    CUDA_VISIBLE_DEVICES="")

    if "tests" in args.only:
        check("pytest tests/test_gpu.py", ["-m", "pytest", "-q", "tests/test_gpu.py"], 420,
              lambda output: output.strip().splitlines()[-1].strip("= "))

    if "train" in args.only:
        rcm_b, copy, rcm_l, dm, cm = (os.path.join(out, d) for d in ("rcm_b", "rcm_b_copy", "rcm_l", "dm_xl", "cm_l"))
        half, ckpt = n // 2, lambda folder: os.path.join(folder, "ckpt_last.pt")
        pretrain = ["pretrain.py", "--model", size("B"), "--steps", n, *common, "--keep-every", half,
                    "--probe-bank", 100, "--probe-queries", 50]
        check(f"pretrain RCM-{size('B')}, {n} steps", [*pretrain, "--out", rcm_b], 360, judge_run(rcm_b, n, cuda))
        check("pretrain rerun: nothing to do", [*pretrain, "--out", rcm_b], 180, needs=ckpt(rcm_b),
              judge=lambda output: "it said so" if "nothing to do" in output else fail("it did not say so"))
        os.makedirs(copy, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(os.path.join(rcm_b, f"ckpt_{half:07d}.pt"), ckpt(copy))
        resumed, same = judge_run(copy, n, False, half), judge_same_losses(rcm_b, copy, 1e-2)
        check(f"pretrain resumed at step {half} in a new OUT", [*pretrain, "--out", copy], 300,
              lambda output: f"{resumed(output)}; {same(output)}", needs=ckpt(copy))
        check(f"pretrain RCM-{size('L')}, 2 steps, eager", ["pretrain.py", "--model", size("L"), "--steps", 2, *device,
              "--batch-size", 8, "--log-every", 1, "--probe-every", 0, "--no-compile", "--out", rcm_l], 240,
              judge_run(rcm_l, 2, False))
        check(f"diffusion EPG-{size('XL')}, {n} steps", ["train_diffusion.py", "--model", size("XL"), "--init",
              ckpt(rcm_b), "--steps", n, *common, "--sample-every", 0, "--eval-samples", 0, "--out", dm], 420,
              judge_run(dm, n, cuda), needs=ckpt(rcm_b))
        check(f"consistency EPG-{size('L')}, {n} steps", ["train_consistency.py", "--model", size("L"), "--init",
              ckpt(rcm_l), "--steps", n, *common, "--out", cm], 420, judge_run(cm, n, cuda), needs=ckpt(rcm_l))

    if "bench" in args.only:                    # on CPU the four rows are all T's: one `--stage all` process
        timing = ([] if args.no_record else ["--record"]) if cuda else ["--device", "cpu", "--iters", 1, "--warmup", 0]
        for stage, model in SPEED_ROWS if cuda else [("all", "T")]:
            check(f"bench {stage} {model}", ["tools/bench.py", "--stage", stage, "--model", model, "--batch-size",
                                             batch if cuda else 2, *timing], 300, judge_bench(check))
        if estimator is None:
            check.add("memory estimate", "skip", 0, "bench.py has no --memory" if cuda else "no CUDA memory on CPU")
        elif check.finish("bench.py --memory", estimator, 300, lambda text: f"{memory_table(text)[1]} per GPU")[0]:
            with open(estimator[1].name) as f:
                compare_memory(check, *memory_table(f.read()), batch)

    if "ddp" in args.only:
        if cuda and torch.cuda.device_count() < 2:
            check.add("ddp: 2 processes against 1", "skip", 0, f"needs 2 GPUs, found {torch.cuda.device_count()}")
        else:
            one, two = os.path.join(out, "ddp_1"), os.path.join(out, "ddp_2")
            flags = ["pretrain.py", "--model", size("B"), "--steps", 3, *common, "--probe-every", 0, "--no-compile"]
            check(f"pretrain RCM-{size('B')}, 3 steps, 1 process", [*flags, "--out", one], 240,
                  judge_run(one, 3, False))
            check(f"pretrain RCM-{size('B')}, 3 steps, 2 processes ({'NCCL' if cuda else 'gloo'}) = 1 process",
                  ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, *flags, "--out", two], 240,
                  judge_same_losses(one, two, 1e-3), needs=os.path.join(one, "ckpt_last.pt"))

    failed = sum(result == "FAIL" for _, result, _, _ in check.rows)
    print("\n| check | result | seconds | detail |\n|---|---|---|---|")
    print("\n".join(f"| {name} | {result} | {seconds:.0f} | {detail} |" for name, result, seconds, detail in
                    check.rows))
    if check.bench_rows:
        print(("\nrows appended to BENCHMARKS.md:\n" if cuda and not args.no_record else "\nbench.py rows:\n")
              + "\n".join(check.bench_rows))
    print(f"\n{len(check.rows) - failed} of {len(check.rows)} checks passed or skipped, {failed} failed, "
          f"{time.time() - t0:.0f} s in all" + (f"; outputs and logs in {out}" if failed else ""))
    if failed:
        sys.exit(1)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
