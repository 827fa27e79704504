"""`make gpu-check`: one short run that proves the GPU path end to end on one H100/H200. Phases (--only picks some):

  tests  pytest tests/test_gpu.py (bf16, compile against eager, flash attention, no host syncs).
  train  30 compiled bf16 steps of 64 images per GPU of each stage at paper size on the embedded data set: RCM-B/16,
         EPG-XL/16 diffusion from it, EPG-L/16 consistency from a 2-step eager RCM-L/16. A run passes when it exits
         0, logs a finite loss at every step, leaves OUT/ckpt_last.pt at the last step and (on CUDA) its loss falls
         from the first third to the last. Resume: rerun, the finished pre-training trains no step; on a new OUT
         holding only its mid-run checkpoint it resumes there and logs the same losses (1e-2; bitwise on CPU).
  bench  bench.py's speed rows (pretrain B, diffusion XL, consistency L, sampling XL), appended to BENCHMARKS.md.
  ddp    with 2 GPUs: 3 eager pre-training steps on 2 processes (torchrun, NCCL) log the losses of 1 (1e-3 relative).

Prints a table of the checks and exits 1 if one failed; every command has a timeout, --budget bounds the whole run,
outputs are in OUT/<check>.log. --device cpu (the default without CUDA) runs the same at tiny size (model T, 6 steps,
one thread, no compile, nothing recorded, ddp on gloo).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rundir  # noqa: E402

PHASES = ("tests", "train", "bench", "ddp")
SPEED_ROWS = (("pretrain", "B"), ("diffusion", "XL"), ("consistency", "L"), ("sampling", "XL"))


class Failed(Exception):
    """A check's verdict, with its reason."""


class Checks:
    """Runs `python ...` commands in the repository root and keeps one summary row per check."""

    def __init__(self, cuda, out, budget):
        self.rows, self.out, self.deadline = [], out, time.time() + (budget or math.inf)
        tiny = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # 1 thread:
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if cuda else tiny)}   # 4x faster on shared cores

    def __call__(self, name, cmd, timeout, judge=lambda output: "", needs=None):
        """Run `python cmd...` (output to OUT/<name>.log): the check passes when it exits 0 and judge(output) returns
        a detail. Not run when the time budget is spent (a failure: the GPU path is not proven) or the file `needs`
        is missing (skipped: what should have written it failed)."""
        if self.deadline - time.time() < 30 or needs and not os.path.isfile(needs):
            spent = self.deadline - time.time() < 30
            self.add(name, "FAIL" if spent else "skip", 0, "not run: " + ("--budget spent" if spent else f"no {needs}"))
            return
        t0 = time.time()
        with open(os.path.join(self.out, re.sub(r"\W+", "_", name).strip("_") + ".log"), "w+", encoding="utf-8",
                  errors="replace") as log:
            log.write(f"$ python {' '.join(map(str, cmd))}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, process_group=0)
            try:
                code = proc.wait(max(1, min(timeout, self.deadline - t0)))
            except BaseException as e:          # the timeout, Ctrl-C, SIGTERM: stop the command's process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)              # torchrun passes it on to its workers
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(15)
                    os.killpg(proc.pid, signal.SIGKILL)
                if not isinstance(e, subprocess.TimeoutExpired):
                    raise
                code = None
            log.seek(0)
            output = log.read()
        try:
            if code != 0:
                raise Failed(f"exit code {code}" if code is not None else
                             f"stopped after {time.time() - t0:.0f} s (its timeout of {timeout} s, or --budget)")
            ok, detail = True, judge(output)
        except (Failed, OSError, ValueError, KeyError, IndexError, rundir.UserError) as e:
            ok, detail = False, str(e) or type(e).__name__
        self.add(name, "ok" if ok else "FAIL", time.time() - t0, detail, None if ok else output)

    def add(self, name, result, seconds, detail, output=None):
        self.rows.append((name, result, seconds, detail))
        print(f"[{result}] {name} ({seconds:.0f} s): {detail}", flush=True)
        if output:
            print("    | " + "\n    | ".join(re.split(r"[\r\n]+", output.strip())[-30:]), flush=True)


def logged(out):
    """The training-loss records of OUT/metrics.jsonl, in the order logged (none without the file)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]


def judge_run(out, steps, trend=True, resumed_at=0, evaluated=False):
    """A finished run: a checkpoint at `steps`, one finite loss logged per step after `resumed_at` (which the run
    must say it resumed from), with `trend` a mean loss of the last third (at least one) below the first's, and with
    `evaluated` an online evaluation of its last step."""
    def judge(output):
        records = map(json.loads, open(os.path.join(out, "metrics.jsonl")))
        if evaluated and not any(r.get("eval_seconds") and r["step"] == steps
                                 and math.isfinite(r.get("fd_ref", math.nan)) for r in records):
            raise Failed(f"no online evaluation of step {steps} in {out}/metrics.jsonl")
        records, step = logged(out), rundir.load_checkpoint(os.path.join(out, "ckpt_last.pt"), mmap=True)["step"]
        loss, k = [r["loss"] for r in records], max(len(records) // 3, 1)
        if step != steps or [r["step"] for r in records] != list(range(resumed_at + 1, steps + 1)):
            raise Failed(f"checkpoint at step {step}, losses logged at {[r['step'] for r in records]}; expected "
                         f"{steps}, {resumed_at + 1}..{steps}")
        if not all(map(math.isfinite, loss)):
            raise Failed(f"non-finite logged losses: {loss}")
        if resumed_at and not re.search(rf"resumed from .* at step {resumed_at}\b", output):
            raise Failed(f"it did not say 'resumed from ... at step {resumed_at}'")
        first, last = sum(loss[:k]) / k, sum(loss[-k:]) / k
        if trend and not last < first:
            raise Failed(f"the loss did not fall: mean {first:.5g} over the first third, {last:.5g} over the last")
        return (f"loss {first:.4g} -> {last:.4g} (means of the first and last third), checkpoint at step {step}, "
                f"{records[-1]['images_per_s']:.0f} img/s, peak {records[-1]['peak_mem_gb']:.1f} GiB")
    return judge


def judge_same_losses(reference, out, tolerance):
    """Every loss logged in `out` is the one `reference` logged at that step, to `tolerance` relative."""
    def judge(output):
        ref, new = ({r["step"]: r["loss"] for r in logged(folder)} for folder in (reference, out))
        if not new or not new.keys() <= ref.keys():
            raise Failed(f"steps {list(new)} are not among the reference's {list(ref)}")
        diff = max(abs(new[s] / ref[s] - 1) for s in new)
        if not diff <= tolerance:
            raise Failed(f"the losses differ by {diff:.2e} relative (more than {tolerance:g})")
        return f"{len(new)} logged losses agree to {diff:.1e} relative"
    return judge


def judge_bench(output):
    """bench.py's result rows, in short."""
    rows = [[c.strip() for c in line.split("|")] for line in output.splitlines() if line.startswith("| ")]
    if not rows:
        raise Failed("bench.py printed no result row")
    return "; ".join(f"{c[1]} {c[2]}: {c[6]} img/s, MFU {c[8]} %, peak {c[9]}" for c in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda: paper sizes, bf16, compile; cpu: tiny sizes (default: cuda when available)")
    p.add_argument("--only", nargs="+", choices=PHASES, default=PHASES, help="run these phases only")
    p.add_argument("--steps", type=int, default=None, help="steps of each training run (default: 30 on CUDA, 6 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--budget", type=float, help="seconds for the whole run: then the running command is stopped "
                                                "and later ones fail as not run")
    p.add_argument("--out", help="folder of every run and log (default: a temporary one, removed if all passed)")
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
    check, t0 = Checks(cuda, out, args.budget), time.time()
    print(f"gpu_check on {f'{torch.cuda.device_count()} CUDA device(s)' if cuda else 'CPU'}: {' '.join(args.only)}, "
          f"{n} steps, batch {batch}, output in {out}", flush=True)          # (no CUDA context in this process)

    if "tests" in args.only:
        check("pytest tests/test_gpu.py", ["-m", "pytest", "-q", "tests/test_gpu.py"], 420,
              lambda output: output.strip().splitlines()[-1].strip("= "))

    def train(script, model, steps, folder, *flags, batch_size=batch):
        return [script, "--model", size(model), "--data", "shapes", "--steps", steps, "--batch-size", batch_size,
                "--log-every", 1, *device, "--out", folder, *flags]

    if "train" in args.only:
        rcm_b, copy, rcm_l, dm, cm = (os.path.join(out, d) for d in ("rcm_b", "rcm_b_copy", "rcm_l", "dm_xl", "cm_l"))
        half, ckpt = n // 2, lambda folder: os.path.join(folder, "ckpt_last.pt")
        probe = ["--keep-every", half, "--probe-bank", 100, "--probe-queries", 50]
        check(f"pretrain RCM-{size('B')}, {n} steps", train("pretrain.py", "B", n, rcm_b, *probe), 360,
              judge_run(rcm_b, n, cuda))
        check("pretrain rerun: no step redone", train("pretrain.py", "B", n, rcm_b, *probe), 180,
              judge_run(rcm_b, n, False), needs=ckpt(rcm_b))    # a redone step would log its loss a second time
        os.makedirs(copy, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(os.path.join(rcm_b, f"ckpt_{half:07d}.pt"), ckpt(copy))
        resumed, same = judge_run(copy, n, False, half), judge_same_losses(rcm_b, copy, 1e-2)
        check(f"pretrain resumed at step {half} in a new OUT", train("pretrain.py", "B", n, copy, *probe), 300,
              lambda output: f"{resumed(output)}; {same(output)}", needs=ckpt(copy))
        check(f"pretrain RCM-{size('L')}, 2 steps, eager", train("pretrain.py", "L", 2, rcm_l, "--probe-every", 0,
              "--no-compile", batch_size=8), 240, judge_run(rcm_l, 2, False))
        check(f"diffusion EPG-{size('XL')}, {n} steps", train("train_diffusion.py", "XL", n, dm, "--init", ckpt(rcm_b),
              "--eval-samples", 32, "--sample-steps", 2), 420, judge_run(dm, n, cuda, evaluated=True),
              needs=ckpt(rcm_b))
        # ^ its last step is evaluated online (evaluate.Evaluator on the GPU: sampling, features, probe, held-out loss)
        check(f"consistency EPG-{size('L')}, {n} steps", train("train_consistency.py", "L", n, cm, "--init",
              ckpt(rcm_l), "--eval-samples", 32), 420, judge_run(cm, n, cuda), needs=ckpt(rcm_l))

    if "bench" in args.only:                    # on CPU the four rows are all T's: one `--stage all` process
        timing = ([] if args.no_record else ["--record"]) if cuda else ["--device", "cpu", "--iters", 1, "--warmup", 0]
        for stage, model in SPEED_ROWS if cuda else [("all", "T")]:
            check(f"bench {stage} {model}", ["tools/bench.py", "--stage", stage, "--model", model, "--batch-size",
                                             batch if cuda else 2, *timing], 300, judge_bench)

    if "ddp" in args.only:
        if cuda and torch.cuda.device_count() < 2:
            check.add("ddp: 2 processes against 1", "skip", 0, f"needs 2 GPUs, found {torch.cuda.device_count()}")
        else:
            one, two = os.path.join(out, "ddp_1"), os.path.join(out, "ddp_2")
            eager = ["--probe-every", 0, "--no-compile"]
            check(f"pretrain RCM-{size('B')}, 3 steps, 1 process", train("pretrain.py", "B", 3, one, *eager), 240,
                  judge_run(one, 3, False))
            check(f"pretrain RCM-{size('B')}, 3 steps, 2 processes ({'NCCL' if cuda else 'gloo'}) = 1 process",
                  ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                   *train("pretrain.py", "B", 3, two, *eager)], 240, judge_same_losses(one, two, 1e-3),
                  needs=os.path.join(one, "ckpt_last.pt"))

    failed = sum(result == "FAIL" for _, result, _, _ in check.rows)
    print("\n| check | result | seconds | detail |\n|---|---|---|---|")
    print("\n".join(f"| {name} | {result} | {seconds:.0f} | {detail} |" for name, result, seconds, detail in
                    check.rows))
    print(f"\n{len(check.rows) - failed} of {len(check.rows)} checks passed or skipped, {failed} failed, "
          f"{time.time() - t0:.0f} s in all" + (f"; outputs and logs in {out}" if failed else ""))
    if failed:
        sys.exit(1)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
