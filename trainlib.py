"""What the three training scripts share for the step a researcher reads: flags from CONFIG, torch.distributed,
precision and compilation, per-step random streams, the optimiser step and the metrics log. A resumed run continues
exactly as the uninterrupted one: every random draw of a step is seeded by (seed, step, rank), the data of step k is a
function of (seed, k), and the checkpoint holds model, EMA/momentum, optimiser state and step. The run directory's
safety (errors, lock, checkpoints, signals) is rundir.py's."""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import tokenize

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import rundir


# ---- Command line: every CONFIG key is a flag, its CONFIG comment the help; PRESETS[--model] the one override ----
RUN = dict(                    # flags of every training script that do not change what is learnt
    data=None,                 # ImageFolder/ImageNet-layout directory (one subfolder per class; tools/prepare.py);
                               # shapes: the embedded toy data set (a folder of that name: ./shapes); none: shapes at
                               # --model T, an error at other sizes
    seed=0,                    # seed of every random stream (data order, noise, init)
    micro_batch=None,          # per-process batch of one forward/backward (gradient accumulation); none: no
                               # accumulation
    device=None,               # cpu, cuda, cuda:N; none: cuda:LOCAL_RANK if available
    compile=None,              # torch.compile every network pass; none: on for CUDA, off for CPU
    num_workers=None,          # data loader workers per process; none: 0 on CPU, the cores per local GPU (<= 16) on
                               # CUDA
    skip_nonfinite=False,      # skip optimiser steps whose loss or gradient is NaN/inf instead of stopping (a host
                               # sync per step)
    max_skipped=100,           # with --skip-nonfinite: stop after this many skipped steps in a row (0: never)
)
EMBEDDED = "shapes"            # --data shapes: the embedded data set of shapes.py, at any size
RUN_TYPES = dict(micro_batch=int, num_workers=int, compile=bool, max_skipped=int)
RUN_POSITIVE, RUN_NON_NEGATIVE = ("micro_batch",), ("seed", "num_workers")   # each script declares its CONFIG's ranges
CODE = ("models.py", "losses.py", "data.py", "trainlib.py", "rundir.py")      # hashed with the stage's script


def config_comments(path, name="CONFIG"):
    """{key: comment} of a file's `NAME = dict(...)` block, read with tokenize: the comment on a key's line and on the
    comment-only lines after it (keys on one line share it)."""
    with open(path, "rb") as f:
        tokens = [t for t in tokenize.tokenize(f.readline) if t.type not in (tokenize.NL, tokenize.NEWLINE)]
    start = next(i for i in range(len(tokens)) if [t.string for t in tokens[i:i + 4]] == [name, "=", "dict", "("]) + 4
    comments, keys, key_line, depth = {}, [], None, 1
    for token, after in zip(tokens[start:], tokens[start + 1:]):
        if token.type == tokenize.OP and token.string in ("(", "[", "{", ")", "]", "}"):
            depth += 1 if token.string in ("(", "[", "{") else -1
            if depth == 0:
                break
        elif depth == 1 and token.type == tokenize.NAME and after.string == "=":           # a keyword: a key
            keys = keys + [token.string] if token.start[0] == key_line else [token.string]
            key_line = token.start[0]
        elif token.type == tokenize.COMMENT:
            for key in keys:
                comments[key] = f"{comments.get(key, '')} {token.string.lstrip('#').strip()}".strip()
    return comments


def _add_flags(p, config, comments, types=None, choices=None):
    for key, default in config.items():
        kind = (types or {}).get(key) or (float if isinstance(default, list) else type(default))   # lists of numbers
        if kind is bool:
            extra = dict(action=argparse.BooleanOptionalAction)
        elif kind is dict:
            extra = dict(type=json.loads, metavar="JSON")
        else:
            extra = dict(type=str if kind is type(None) else kind, nargs="*" if isinstance(default, list) else None)
        p.add_argument("--" + key.replace("_", "-"), default=default, help=comments.get(key, " ").replace("%", "%%"),
                       choices=(choices or {}).get(key), **extra)


def parse(path, config, presets, argv=None, choices=None, types=None, positive=(), non_negative=(), fraction=()):
    """argparse over the script's CONFIG and RUN, with presets[--model] as defaults (an explicit flag wins, and
    `--model T --help` shows the values a tiny run will use); the script's ranges (positive, non_negative, fraction:
    in [0, 1)) and RUN's are checked here."""
    doc = sys.modules.get("__main__").__doc__ if os.path.abspath(sys.argv[0]) == os.path.abspath(path) else None
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_flags(p, config, config_comments(path), types, choices)
    _add_flags(p, RUN, config_comments(__file__, "RUN"), RUN_TYPES)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=config.get("model"))
    p.set_defaults(**presets.get(pre.parse_known_args(argv)[0].model, {}))
    args = p.parse_args(argv)
    bad = [f"--{k.replace('_', '-')} must be {rule}, got {getattr(args, k)}" for keys, rule, ok in (
        ((*positive, *RUN_POSITIVE), "positive", lambda v: v > 0),
        ((*non_negative, *RUN_NON_NEGATIVE), ">= 0", lambda v: v >= 0),
        (fraction, "in [0, 1)", lambda v: 0 <= v < 1)) for k in keys if getattr(args, k, None) is not None
        and not ok(getattr(args, k))]
    if bad:
        raise rundir.UserError("; ".join(bad))
    check_values(args)
    if args.data is None and args.model != "T":
        raise rundir.UserError(f"--model {args.model} trains on ImageFolder data: pass --data DIR, a folder of class "
                               f"sub-folders prepared once with `python tools/prepare.py SRC DIR --image-size "
                               f"{args.image_size}` (or --data {EMBEDDED} for the embedded toy data set at this size)")
    args.data = None if args.data == EMBEDDED else args.data             # None: the embedded data set from here on
    return args


def check_values(args):
    """What no flag may hold: nan/inf in a float flag, --betas outside [0, 1), a seed beyond 2^63, a negative
    --max-skipped."""
    for key, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise rundir.UserError(f"--{key.replace('_', '-')} must be a finite number, got {v}")
    betas = getattr(args, "betas", (0, 0))
    if len(betas) != 2:
        raise rundir.UserError(f"--betas takes two values (beta1 beta2), got {betas}")
    if not all(0 <= b < 1 for b in betas):
        raise rundir.UserError(f"--betas must lie in [0, 1), got {' '.join(map(str, betas))}")
    if getattr(args, "seed", 0) >= 2 ** 63:
        raise rundir.UserError(f"--seed must be below 2^63, got {args.seed}")
    if getattr(args, "max_skipped", 0) < 0:
        raise rundir.UserError(f"--max-skipped must be >= 0, got {args.max_skipped}")



# ---- Resume: the code and the settings of the run being continued ----
def code_fingerprint(script):
    """sha256 over the stage's script and CODE, and git HEAD where the code sits in a git checkout (else None)."""
    root = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for path in (os.path.abspath(script), *(os.path.join(root, name) for name in CODE)):
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        commit = head.stdout.strip() if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"sha256": digest.hexdigest(), "git": commit}


def check_resume(saved, current, may_change, steps_fixed=False):
    """rundir.check_resume with the script's `may_change` keys plus RUN's (but --seed) and the code fingerprint:
    code changed since the checkpoint gets one note and the run goes on (scripts are edited on purpose)."""
    rundir.check_resume(saved, current, {*may_change, *RUN.keys() - {"seed"}, "code", "train_flops", "init_flops"},
                        steps_fixed)
    before, now = saved.get("code") or {}, current.get("code") or {}
    if before.get("sha256") != now.get("sha256") and rank_world()[0] == 0:
        print(f"note: the code differs from that of the checkpoint (sha256 {str(before.get('sha256'))[:12]}, git "
              f"{str(before.get('git'))[:12]} -> {str(now.get('sha256'))[:12]}, git {str(now.get('git'))[:12]}); "
              f"resuming with the code as it is now", file=sys.stderr)


# ---- Distributed, precision, compilation ----
class Env:
    """rank, world, local_rank, device of this process; `main` is rank 0."""

    def __init__(self, rank, world, local_rank, device):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.main, self.distributed = rank == 0, world > 1

    def log(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs, flush=True)


def init_device(device_arg=None):
    """This process's device (cuda:LOCAL_RANK where no index is given) and, under torchrun, its process group (NCCL on
    CUDA, gloo on CPU)."""
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise rundir.UserError("--device cuda was given but no CUDA device is available; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def init_distributed(device_arg=None):
    """init_device, and SIGTERM/SIGINT set the pre-emption flag (see preempted) -> Env."""
    device, (rank, world) = init_device(device_arg), rank_world()
    rundir.catch_stop_signals(world)
    return Env(rank, world, int(os.environ.get("LOCAL_RANK", "0")), device)


def num_workers(args, env):
    if args.num_workers is not None or env.device.type != "cuda":
        return args.num_workers or 0
    return max(1, min(16, (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1) - 1))


def split_batch(global_batch, world, micro_batch=None):
    """(per-process batch, micro-batch, accumulation steps) of a global batch."""
    if global_batch % world:
        raise rundir.UserError(f"global batch {global_batch} is not divisible by the world size {world}; "
                        f"use a multiple of {world}")
    local = global_batch // world
    micro = micro_batch or local
    if local % micro:
        raise rundir.UserError(f"per-process batch {local} (= {global_batch} / {world} processes) is not divisible by "
                        f"--micro-batch {micro}; choose a divisor of {local}")
    return local, micro, local // micro


def micro_batches(net, local_batch, micro):
    """(slice, context) of each micro-batch: under DDP only the last backward all-reduces (the others: no_sync)."""
    for start in range(0, local_batch, micro):
        last = start + micro == local_batch
        yield slice(start, start + micro), (net.no_sync() if isinstance(net, DDP) and not last
                                            else contextlib.nullcontext())


def ddp(module, env):
    if not env.distributed:
        return module
    return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def compiled(fn, args, device):
    return torch.compile(fn) if (args.compile if args.compile is not None else device.type == "cuda") else fn


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}



# ---- Random streams: one seed hasher for the whole repository ----
def mix_seed(*values):
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_step(seed, step, rank):
    """Global RNGs (CPU, CUDA) from (seed, step, rank): dropout becomes a function of the step, no RNG state saved."""
    torch.manual_seed(mix_seed(seed, step, rank, 1))


def step_generator(seed, step, device, stream=0):
    """A generator shared by all ranks for draws over the GLOBAL batch (each rank slices its part), so that the run
    does not depend on the number of processes; `stream` separates the uses within a step (losses.STREAM_*)."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, stream, 2))


def step_generators(seed, step):
    """generator(device, stream) of step `step`: what the draws of losses.py take."""
    return functools.partial(step_generator, seed, step)



# ---- Optimisation ----
@torch.no_grad()
def ema_update(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta over parameters (buffers are copied)."""
    for p_ema, p in zip(ema_model.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def adamw(model, lr, betas, weight_decay, no_decay=(), device=None, lr_scale=None):
    """AdamW over the parameters that require gradients; none of weight decay for names ending in `no_decay`;
    `lr_scale(name)`: a per-parameter lr multiplier (layer-wise decay), kept in the group as "lr_scale"."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.split(".")[-1] in no_decay, lr_scale(name) if lr_scale else 1.0)
            groups.setdefault(key, []).append(p)
    groups = [{"params": ps, "weight_decay": 0.0 if skip else weight_decay, "lr_scale": scale}
              for (skip, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]
    # fused: one kernel per step on CUDA and on CPU (EPG-T on a 2-core CPU: 4 ms a step, the per-tensor loop 13 ms)
    fused = device is not None and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def warmup_cosine(step, total, base_lr, warmup=0):
    """Linear warm-up over `warmup` steps (from 0), then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * step / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def learning_rate(step, args, base_lr):
    """The lr of `step` under --lr-schedule: cosine (warmup_cosine to 0 at --steps), constant, or step (base_lr times
    the factor of the last --lr-milestones passed, Table 11); constant and step take the same linear warm-up. A
    --cooldown of N steps (where a script has one) then decays it linearly to 0 over the last N steps."""
    if args.lr_schedule == "cosine":
        lr = warmup_cosine(step, args.steps, base_lr, args.warmup)
    else:
        lr = base_lr
        for milestone, factor in zip(getattr(args, "lr_milestones", ()), getattr(args, "lr_factors", ())):
            if step >= milestone:
                lr = base_lr * factor
        lr = lr * min(1.0, step / args.warmup) if args.warmup > 0 else lr
    cooldown = getattr(args, "cooldown", 0)
    return lr * min(1.0, (args.steps - step) / cooldown) if cooldown else lr


class Stepper:
    """step(loss): clip the gradient norm (clip > 0; `.norm` is the norm before), then with --skip-nonfinite skip the
    update when the averaged loss or the norm is NaN/inf (restoring the buffers, e.g. BatchNorm statistics, of the
    step's forwards); True when applied. Otherwise a NaN/inf stops the run at the next log line or checkpoint."""

    def __init__(self, optimizer, model, skip_nonfinite=False, buffers_of=(), log=print):
        self.optimizer, self.model, self.skip, self.log = optimizer, model, skip_nonfinite, log
        self.buffers = [b for m in buffers_of for b in m.buffers()] if skip_nonfinite else []
        self.saved = [b.clone() for b in self.buffers]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.norm = None

    def step(self, loss, clip=0.0, step=None):
        params = self.params
        if clip > 0:
            self.norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:                                      # the same global L2 norm, a device tensor (no host sync)
            self.norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        applied = not self.skip or (torch.isfinite(all_reduce_mean(loss.detach().clone())).all()
                                    & torch.isfinite(self.norm)).item()
        if not applied:
            self.log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
            for b, saved in zip(self.buffers, self.saved):
                b.copy_(saved)
        else:
            self.optimizer.step()
            for b, saved in zip(self.buffers, self.saved):
                saved.copy_(b)
        self.optimizer.zero_grad(set_to_none=True)
        return applied


# ---- Logs ----
class Meter:
    """OUT/metrics.jsonl (rank 0). add(terms) sums a step's loss terms (loss first); log() writes their averaged mean
    every --log-every steps with lr, grad norm, images/s and peak memory. On resume, records beyond the checkpoint's
    step and lines that do not parse (a write cut short) are dropped."""

    def __init__(self, args, env, names, resume_step=0, desc="train"):
        self.path, self.env, self.names, self.args = os.path.join(args.out, "metrics.jsonl"), env, names, args
        self.sums, self.count = torch.zeros(len(names), device=env.device), 0
        self.t0, self.images, self.added, self.steps, self.skipped_in_a_row = time.perf_counter(), 0, False, 0, 0
        if env.main and os.path.isdir(self.path):
            raise rundir.UserError(f"{self.path} is a directory; move it away (the metrics log is a file)")
        if env.main and not resume_step and os.path.isfile(self.path):      # a fresh start: never append to it
            rundir.fence(self.path)
            os.replace(self.path, self.path + ".old")
            print(f"note: a fresh start: the old {self.path} was moved to {self.path}.old", file=sys.stderr)
        if env.main and resume_step and os.path.isfile(self.path):
            kept, torn = [], 0
            with open(self.path, "rb") as f:
                for line in filter(bytes.strip, f):
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError(line)
                        if record.get("step", 0) <= resume_step:
                            kept.append(line)
                    except (ValueError, TypeError):
                        torn += 1
            if torn:
                print(f"note: dropped {torn} unreadable line(s) of {self.path} (a write cut short)", file=sys.stderr)
            rundir.write_atomically(self.path, lambda f: f.writelines(line.rstrip(b"\n") + b"\n" for line in kept))
        self.bar = progress(args.steps, resume_step, env.main, desc)

    def add(self, terms):
        self.sums += terms
        self.count += 1
        self.added = True

    def log(self, step, grad_norm=None, **extra):
        """After every step; device tensors among `extra` are read only at the log points (no step waits). Steps that
        --skip-nonfinite skipped (no add) are counted: a window of only skipped steps logs null losses, and
        --max-skipped skipped steps in a row stop the run."""
        self.images += self.args.batch_size
        self.steps += 1
        self.skipped_in_a_row = 0 if self.added else self.skipped_in_a_row + 1
        self.added = False
        self.bar.update(1)
        limit = getattr(self.args, "max_skipped", 0)
        if limit and self.skipped_in_a_row >= limit:
            raise rundir.UserError(f"{self.skipped_in_a_row} steps in a row up to step {step} had a non-finite loss or "
                                   f"gradient and were skipped; the run stopped and the last good checkpoint was kept. "
                                   f"Lower --lr or check the data")
        if step % self.args.log_every and step != self.args.steps:
            return None
        mean = (all_reduce_mean(self.sums) / max(self.count, 1)).tolist()
        skipped, self.steps = self.steps - self.count, 0
        if not self.count:                         # every step of the window was skipped: no loss to report
            mean = [None] * len(mean)
        elif not math.isfinite(mean[0]):
            raise rundir.UserError(f"loss became {mean[0]} at or before step {step}; the run stopped and the last good "
                            f"checkpoint was kept. Lower --lr, check the data, or pass --skip-nonfinite")
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        now = time.perf_counter()
        extra = {k: v.item() if torch.is_tensor(v) else v for k, v in extra.items()}
        grad_norm = None if grad_norm is None else float(grad_norm)
        record = dict(step=step, **dict(zip(self.names, mean)), **extra,
                      grad_norm=grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                      **({"skipped": skipped} if self.args.skip_nonfinite else {}),
                      images_per_s=self.images / max(now - self.t0, 1e-9), peak_mem_gb=peak_memory_gb(self.env.device))
        self.write(**record)
        self.bar.set_postfix({k: "-" if v is None else f"{v:.4g}" for k, v in zip(self.names, mean)})
        self.sums.zero_()
        self.count, self.t0, self.images = 0, now, 0
        return record

    def write(self, **record):
        """Append one line (rank 0), never a torn one (rundir.append_line)."""
        if self.env.main:
            rundir.append_line(self.path, json.dumps(record))

    def exclude(self, seconds):
        """Leave `seconds` (an evaluation) out of images/s and the progress bar's rate."""
        self.t0 += seconds
        self.bar.unpause()

    def close(self):
        self.bar.close()


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def progress(total, initial, enabled, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)

