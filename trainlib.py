"""What the three training scripts share, so that each script holds its stage's algorithm and little else: flags
generated from CONFIG, torch.distributed from the torchrun environment, random streams per step, the optimiser step
with its non-finite policy, the metrics log, atomic checkpoints, an output-directory lock and pre-emption.

Plain functions and two small classes, no project imports. Determinism and resume: every random draw of a step comes
from streams seeded by (seed, step, rank), and the data of step k is a function of (seed, k) (data.BatchStream);
model, EMA/momentum, optimiser state and step are in the checkpoint, so a resumed run continues exactly as the
uninterrupted one would have.
"""
import argparse
import atexit
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


class UserError(Exception):
    """A problem the user can fix (bad flag, incompatible checkpoint, missing data, ...): one line, exit code 2."""


class Preempted(Exception):
    """SIGTERM arrived; the run saved its checkpoint and stops with exit code 143."""


def cli_main(main, *user_errors):
    """Run `main()`; UserError (and the given exception classes) become one line on stderr and exit code 2."""
    try:
        main()
    except (UserError, *user_errors) as e:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()                                 # so that the message starts a line of its own
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        release_locks()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Command line: every CONFIG key is a flag, its CONFIG comment the help; PRESETS[--model] the one override
# ----------------------------------------------------------------------------------------------------------------
RUN = dict(                    # flags of every training script that do not change what is learnt
    data=None,                 # ImageFolder/ImageNet-layout directory (one subfolder per class); none: the embedded data set
    seed=0,                    # seed of every random stream (data order, noise, init)
    micro_batch=None,          # per-process batch of one forward/backward (gradient accumulation); none: no accumulation
    device=None,               # cpu, cuda, cuda:N; none: cuda:LOCAL_RANK if available
    compile=None,              # torch.compile every network pass; none: on for CUDA, off for CPU
    num_workers=None,          # data loader workers per process; none: 0 on CPU, the cores per local GPU (<= 16) on CUDA
    skip_nonfinite=False,      # skip optimiser steps whose loss or gradient is NaN/inf instead of stopping (a host sync per step)
)
RUN_TYPES = dict(micro_batch=int, num_workers=int, compile=bool)
# keys that may change when a run is resumed (paths, cadences, machine); every other CONFIG key must match
MAY_CHANGE = {*RUN.keys() - {"seed"}, "out", "init", "init_diffusion", "aux_ckpt", "ckpt_every", "keep_every", "log_every",
              "probe_every", "probe_bank", "probe_queries", "sample_every", "sample_steps", "eval_samples", "steps"}
POSITIVE = ("image_size", "batch_size", "steps", "lr", "ckpt_every", "log_every", "micro_batch", "sample_steps",
            "probe_bank", "probe_queries", "p_std", "huber_c", "aux_tau", "ctr_tau", "tau1", "tau2", "stage_interval")
NON_NEGATIVE = ("seed", "keep_every", "num_workers", "warmup", "probe_every", "sample_every", "eval_samples",
                "grad_clip", "weight_decay", "proj_dim", "lrd")
FRACTION = ("ema", "momentum", "label_dropout", "dropout")        # in [0, 1)


def config_comments(path, name="CONFIG"):
    """{key: comment} of the `NAME = dict(...)` block of a source file: a key's help is the comment of its line
    (keys on one line share it), continued by comment-only lines below it."""
    comments, keys, inside = {}, [], False
    with open(path) as f:
        for line in f:
            code, _, comment = line.partition("#")
            if not inside:
                inside = code.strip() == f"{name} = dict("
                continue
            if code.strip() == ")":
                break
            found = re.findall(r"(\w+)=(?!=)", code)
            keys = found or keys
            for key in keys if comment.strip() else ():
                comments[key] = f"{comments.get(key, '')} {comment.strip()}".strip()
    return comments


def _add_flags(p, config, comments, types=None, choices=None):
    for key, default in config.items():
        kind = (types or {}).get(key) or (float if isinstance(default, list) else type(default))   # lists of numbers
        flag, extra = "--" + key.replace("_", "-"), {}
        if kind is bool:
            extra = dict(action=argparse.BooleanOptionalAction)
        elif kind is dict:
            extra = dict(type=json.loads, metavar="JSON")
        else:
            extra = dict(type=str if kind is type(None) else kind, nargs="*" if isinstance(default, list) else None)
        p.add_argument(flag, default=default, help=comments.get(key, " ").replace("%", "%%"),
                       choices=(choices or {}).get(key), **extra)


def parse(path, config, presets, argv=None, choices=None, types=None):
    """argparse over RUN and the script's CONFIG (help: the CONFIG comments of `path`), with presets[--model] (e.g.
    the CPU overrides of T) applied as defaults: an explicit flag wins, an edit of CONFIG takes effect, and
    `--model T --help` shows the values a tiny run will use. Ranges are checked here, with one-line errors."""
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
        (POSITIVE, "positive", lambda v: v > 0), (NON_NEGATIVE, ">= 0", lambda v: v >= 0),
        (FRACTION, "in [0, 1)", lambda v: 0 <= v < 1)) for k in keys if getattr(args, k, None) is not None
        and not ok(getattr(args, k))]
    if bad:
        raise UserError("; ".join(bad))
    if len(getattr(args, "betas", (0, 0))) != 2:
        raise UserError(f"--betas takes two values (beta1 beta2), got {args.betas}")
    return args


def checked(fn, *args, context=""):
    """fn(*args), its ValueError (a model that does not fit, ...) turned into a UserError with `context`."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UserError(f"{context}{e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Distributed, precision, compilation
# ----------------------------------------------------------------------------------------------------------------
class Env:
    """rank, world, local_rank, device of this process; `main` is rank 0."""

    def __init__(self, rank, world, local_rank, device):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.main, self.distributed = rank == 0, world > 1

    def log(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs, flush=True)


def init_distributed(device_arg=None):
    """Process group from the torchrun environment (NCCL on CUDA, gloo on CPU); plain `python` runs without one.
    The device comes from LOCAL_RANK, so multi-node runs place each process correctly."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1:                                  # a CPU group for the pre-emption flag: no device sync per step
        _STOP["group"] = dist.new_group(backend="gloo")
    signal.signal(signal.SIGTERM, _on_sigterm)
    return Env(rank, world, local_rank, device)


def num_workers(args, env):
    """--num-workers, or 0 on CPU and the machine's cores per local GPU (at most 16) on CUDA."""
    if args.num_workers is not None or env.device.type != "cuda":
        return args.num_workers or 0
    return max(1, min(16, (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1) - 1))


def split_batch(global_batch, world, micro_batch=None):
    """(per-process batch, micro-batch, accumulation steps) of a global batch; clear error when impossible."""
    if global_batch % world:
        raise UserError(f"global batch {global_batch} is not divisible by the world size {world}; "
                        f"use a multiple of {world}")
    local = global_batch // world
    micro = micro_batch or local
    if local % micro:
        raise UserError(f"per-process batch {local} (= {global_batch} / {world} processes) is not divisible by "
                        f"--micro-batch {micro}; choose a divisor of {local}")
    return local, micro, local // micro


def micro_batches(net, local_batch, micro):
    """(slice, context) of each micro-batch of a step: under DDP the gradients are all-reduced only in the last
    backward (the others run under no_sync)."""
    count = local_batch // micro
    for m in range(count):
        last = m == count - 1
        yield slice(m * micro, (m + 1) * micro), (net.no_sync() if isinstance(net, DDP) and not last
                                                  else contextlib.nullcontext())


def ddp(module, env):
    """`module` wrapped in DistributedDataParallel when there are several processes."""
    if not env.distributed:
        return module
    return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def all_reduce_mean(t):
    """Average a tensor over processes (in place); no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def autocast(device):
    """bf16 autocast on CUDA, fp32 (no autocast) on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def compiled(fn, args, device):
    """torch.compile(fn) when --compile (default: on CUDA); fn itself otherwise."""
    return torch.compile(fn) if (args.compile if args.compile is not None else device.type == "cuda") else fn


def to_device(batch, device):
    """The tensors of a batch dict on `device` (asynchronous copies from pinned memory on CUDA)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the global batch of all processes for CPU (gloo) process groups, where nn.SyncBatchNorm
    cannot run; gradients flow through the differentiable all-reduce, as in SyncBatchNorm."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        count = dist_nn.all_reduce(x.new_full((1,), float(x.shape[0])))
        mean = dist_nn.all_reduce(x.sum(dim=0)) / count
        var = dist_nn.all_reduce((x - mean).pow(2).sum(dim=0)) / count                   # biased, as BatchNorm
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def sync_batchnorm(module, env):
    """BatchNorm with global-batch statistics under DDP (nn.SyncBatchNorm on GPU, GlobalBatchNorm1d on CPU)."""
    if not env.distributed:
        return module
    if env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            bn = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, env)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Random streams: one seed hasher for the whole repository
# ----------------------------------------------------------------------------------------------------------------
def mix_seed(*values):
    """Hash non-negative integers into one well-mixed 63-bit seed (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_step(seed, step, rank):
    """Seed the global RNGs (CPU and CUDA) from (seed, step, rank): dropout and any other draw of this step become a
    function of the step, so resume needs no saved RNG state."""
    torch.manual_seed(mix_seed(seed, step, rank, 1))


def step_generator(seed, step, device, stream=0):
    """A generator shared by all ranks for draws over the whole GLOBAL batch (each rank slices its part), so the run
    does not depend on the number of processes. `stream` separates independent uses within a step."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, stream, 2))


# ----------------------------------------------------------------------------------------------------------------
# Output directory, checkpoints, pre-emption
# ----------------------------------------------------------------------------------------------------------------
def prepare_output(out, main=True):
    """Create OUT, check that it is writable and take its lock (OUT/.lock, naming host and pid): a second run on
    the same OUT is refused; a lock left by a dead process on this host is taken over. Rank 0 only."""
    if not main:
        return
    probe = os.path.join(out, f".write-test-{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
    except OSError as e:
        raise UserError(f"output directory '{out}' is not writable ({e.strerror}); choose another --out") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    lock, me = os.path.join(out, ".lock"), f"{socket.gethostname()} {os.getpid()}"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(lock) as f:
            host, _, pid = f.read().strip().partition(" ")
        if host != socket.gethostname() or (_alive(int(pid or 0)) and int(pid) != os.getpid()):
            raise UserError(f"'{out}' is in use by another run (host {host}, pid {pid}); wait for it to finish or "
                            f"choose another --out (delete {lock} if that run is gone)") from None
        if int(pid or 0) != os.getpid():
            print(f"note: taking over the lock of a dead run (pid {pid}) in {out}", file=sys.stderr)
        fd = os.open(lock, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, me.encode())
    os.close(fd)
    _LOCKS.append((lock, me))


_LOCKS = []


def release_locks():
    """Remove the output locks this process holds (at the end of cli_main, and at exit)."""
    while _LOCKS:
        lock, me = _LOCKS.pop()
        with contextlib.suppress(OSError):
            with open(lock) as f:
                if f.read().strip() == me:
                    os.remove(lock)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


atexit.register(release_locks)


def save_checkpoint(path, state):
    """Write `state` to `path` atomically (temporary file, fsync, rename): a kill or a full disk at any moment
    leaves the old file or the new one, never a torn one, and no temporary file behind. Weights that became
    NaN/inf are never written over a good checkpoint."""
    for name, value in state.items():
        if isinstance(value, dict) and not all(t.isfinite().all() for t in value.values()
                                               if torch.is_tensor(t) and t.is_floating_point()):
            raise UserError(f"the {name} weights became non-finite at or before step {state.get('step')}; the last "
                            f"good checkpoint was kept. Lower --lr, check the data, or pass --skip-nonfinite")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:           # torch.save's zip writer reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not write checkpoint '{path}' ({reason}); free disk space or choose another --out. "
                        f"The previous checkpoint is intact.") from None
    folder, prefix = os.path.dirname(path) or ".", os.path.basename(path) + ".tmp-"
    for name in os.listdir(folder):                # leftovers of earlier writers that were killed mid-write
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def write_json(path, obj):
    """Write a JSON file atomically (config.json, metrics summaries)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_checkpoint(path, stage=None, mmap=False):
    """A checkpoint of this project (weights_only=True); `stage` (a name or tuple) checks which script wrote it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise UserError(f"checkpoint '{path}' is unreadable or corrupt ({type(e).__name__}); use another "
                        f"checkpoint (the authors' released weights: python tools/official.py convert {path} "
                        f"OUT.pt)") from None
    if not isinstance(state, dict) or "stage" not in state or "config" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project; if it holds the authors' released weights, "
                        f"convert it first: python tools/official.py convert {path} OUT.pt")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and state["stage"] not in stages:
        raise UserError(f"'{path}' is a {state['stage']} checkpoint, but a {' or '.join(stages)} checkpoint is "
                        f"needed here")
    return state


def resume_state(args, stage, log=print):
    """OUT/ckpt_last.pt of the run being resumed, or None for a fresh run."""
    path = os.path.join(args.out, "ckpt_last.pt")
    state = load_checkpoint(path, stage) if os.path.exists(path) else None
    if state is not None and state["step"] >= args.steps:
        log(f"{path} is already at step {state['step']} >= --steps {args.steps}; nothing to do")
    return state


def inherit(args, name, saved, source):
    """A flag left at None takes the value recorded in `saved` (a checkpoint's config); an explicit value that
    contradicts the recorded one is refused."""
    flag, value = f"--{name.replace('_', '-')}", saved.get(name)
    if getattr(args, name) is None:
        setattr(args, name, value)
    elif value is not None and getattr(args, name) != value:
        raise UserError(f"{flag} {getattr(args, name)} differs from the {value} of {source}; drop {flag} or pass "
                        f"{flag} {value}")


def load_init(args):
    """The RCM checkpoint of --init that fine-tuning starts from, or None with --from-scratch (exactly one)."""
    if args.init and args.from_scratch:
        raise UserError("--init and --from-scratch exclude each other; pass one of them")
    if not (args.init or args.from_scratch):
        raise UserError("fine-tuning needs a pre-trained encoder: pass --init OUT/ckpt_last.pt of pretrain.py (or "
                        "--from-scratch for the ablation without pre-training)")
    return load_checkpoint(args.init, "pretrain") if args.init else None


def check_resume(saved, current, steps_fixed=False):
    """Refuse to resume when a setting that defines the run differs (nothing is overwritten): every config key but
    paths, cadences and machine flags (MAY_CHANGE), and --steps where a schedule depends on it."""
    keys = [k for k in current if k not in MAY_CHANGE and k != "data_id"] + (["steps"] if steps_fixed else [])
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {current.get(k)} (now)"
             for k in keys if saved.get(k) != current.get(k)]
    if saved.get("data_id") != current.get("data_id"):
        diffs.append("the data set's classes or image count changed")
    elif saved.get("data") != current.get("data"):
        print(f"note: the data path changed ({saved.get('data')} -> {current.get('data')}) but its classes and image "
              f"count did not; resuming", file=sys.stderr)
    if diffs:
        raise UserError("cannot resume: the output directory holds a run with different settings: "
                        + "; ".join(diffs) + ". Use the same arguments or another --out")


_STOP = {"requested": False}


def _on_sigterm(signum, frame):
    _STOP["requested"] = True


def preempted(env):
    """True when SIGTERM arrived (SLURM, Kubernetes): the caller saves its checkpoint and raises Preempted. Under
    DDP the ranks agree every step through an all-reduce of a CPU flag (gloo), so that they stop at the same step
    without synchronising the GPU."""
    if not env.distributed:
        return _STOP["requested"]
    flag = torch.tensor([float(_STOP["requested"])])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_STOP["group"])
    return bool(flag.item())


def checkpoint(env, args, step, state):
    """End of a step: OUT/ckpt_last.pt every --ckpt-every steps, at the end and on SIGTERM (then Preempted is
    raised); OUT/ckpt_<step>.pt every --keep-every steps. `state()` builds the checkpoint dict (rank 0 only)."""
    stop = preempted(env)
    last = os.path.join(args.out, "ckpt_last.pt")
    if env.main and (step % args.ckpt_every == 0 or step == args.steps or stop):
        save_checkpoint(last, state())
    if env.main and args.keep_every and step % args.keep_every == 0:
        save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), state())
    if stop:
        raise Preempted(f"SIGTERM: stopped after step {step}, checkpoint {last}; rerun to resume")


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta over parameters (buffers are copied)."""
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def adamw(model, lr, betas, weight_decay, no_decay=(), device=None, lr_scale=None):
    """AdamW; parameters whose name ends with one of `no_decay` get no weight decay. `lr_scale(name)`, when given,
    is a per-parameter multiplier of the lr (layer-wise decay), kept in the group as "lr_scale". Parameters that
    do not require gradients are left out. Fused kernels on CUDA."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.split(".")[-1] in no_decay, lr_scale(name) if lr_scale else 1.0)
            groups.setdefault(key, []).append(p)
    groups = [{"params": ps, "weight_decay": 0.0 if skip else weight_decay, "lr_scale": scale}
              for (skip, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device is not None and device.type == "cuda")


def set_lr(optimizer, lr):
    """Set the lr of every parameter group (times its lr_scale); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def warmup_cosine(step, total, base_lr, warmup=0):
    """Linear warm-up over `warmup` steps (from 0), then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * step / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def learning_rate(step, args, base_lr):
    """The lr of `step` under --lr-schedule: cosine (linear warm-up over --warmup, then cosine to 0 at --steps),
    constant, or step (base_lr times the factor of the last --lr-milestones passed, Table 11); constant and step
    take the same linear warm-up from 0."""
    if args.lr_schedule == "cosine":
        return warmup_cosine(step, args.steps, base_lr, args.warmup)
    lr = base_lr
    for milestone, factor in zip(getattr(args, "lr_milestones", ()), getattr(args, "lr_factors", ())):
        if step >= milestone:
            lr = base_lr * factor
    return lr * min(1.0, step / args.warmup) if args.warmup > 0 else lr


def grad_norm(model):
    """Global L2 norm of the gradients (a device tensor, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


class Stepper:
    """The optimiser step and the non-finite policy, once for every script. step(loss): clip the gradient norm
    (clip > 0), then with --skip-nonfinite skip the update when the process-averaged loss or the gradient norm is
    NaN/inf (restoring the buffers, e.g. BatchNorm statistics, that the step's forward passes changed), else apply
    it. Returns True when the update was applied; `.norm` is the gradient norm before clipping (device tensor).
    Without --skip-nonfinite a NaN/inf is caught at the next log line (Meter) or checkpoint (save_checkpoint)."""

    def __init__(self, optimizer, model, skip_nonfinite=False, buffers_of=(), log=print):
        self.optimizer, self.model, self.skip, self.log = optimizer, model, skip_nonfinite, log
        self.buffers = [b for m in buffers_of for b in m.buffers()] if skip_nonfinite else []
        self.saved = [b.clone() for b in self.buffers]
        self.norm = None

    def step(self, loss, clip=0.0, step=None):
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else grad_norm(self.model)
        applied = True
        if self.skip and not (torch.isfinite(all_reduce_mean(loss.detach().clone())).all()
                              & torch.isfinite(self.norm)).item():
            self.log(f"step {step}: non-finite loss or gradient, optimiser step skipped")
            for b, saved in zip(self.buffers, self.saved):
                b.copy_(saved)
            applied = False
        else:
            self.optimizer.step()
            for b, saved in zip(self.buffers, self.saved):
                saved.copy_(b)
        self.optimizer.zero_grad(set_to_none=True)
        return applied


# ----------------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------------
class Meter:
    """OUT/metrics.jsonl, one JSON object per line (rank 0 writes). add(terms) sums a step's loss terms (a device
    tensor: loss first, then the named terms) over the applied steps; at every --log-every step and the last,
    log(step, ...) writes their process-averaged mean with lr, grad norm, images/s and peak memory, and stops the run
    with a clear message when the loss is NaN/inf. On resume, records beyond the checkpoint's step are dropped."""

    def __init__(self, args, env, names, resume_step=0, desc="train"):
        self.path, self.env, self.names, self.args = os.path.join(args.out, "metrics.jsonl"), env, names, args
        self.sums, self.count = torch.zeros(len(names), device=env.device), 0
        self.t0, self.images = time.perf_counter(), 0
        if env.main and resume_step and os.path.isfile(self.path):
            with open(self.path) as f:
                lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(lines)
        self.bar = progress(args.steps, resume_step, env.main, desc)

    def add(self, terms):
        self.sums += terms
        self.count += 1

    def log(self, step, grad_norm=None, **extra):
        """Called after every step; writes at the log points (device tensors among `extra` are read only there, so
        no step waits for the device). Returns the record written, or None."""
        self.images += self.args.batch_size
        self.bar.update(1)
        if step % self.args.log_every and step != self.args.steps:
            return None
        mean = (all_reduce_mean(self.sums) / max(self.count, 1)).tolist()
        if not math.isfinite(mean[0]):
            raise UserError(f"loss became {mean[0]} at or before step {step}; the run stopped and the last good "
                            f"checkpoint was kept. Lower --lr, check the data, or pass --skip-nonfinite")
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        now = time.perf_counter()
        extra = {k: v.item() if torch.is_tensor(v) else v for k, v in extra.items()}
        record = dict(step=step, **dict(zip(self.names, mean)), **extra,
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      images_per_s=self.images / max(now - self.t0, 1e-9), peak_mem_gb=peak_memory_gb(self.env.device))
        self.write(**record)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in zip(self.names, mean)})
        self.sums.zero_()
        self.count, self.t0, self.images = 0, now, 0
        return record

    def write(self, **record):
        if self.env.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self):
        self.bar.close()


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def progress(total, initial, enabled, desc):
    """tqdm progress bar with ETA on the main process (a no-op object elsewhere)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# kNN probe of an encoder (pre-training's progress; the fine-tuning experiments of demo.py)
# ----------------------------------------------------------------------------------------------------------------
class KnnProbe:
    """Weighted kNN accuracy (k = 20, votes exp(cos / 0.07), as InstDisc/DINO) of an encoder's L2-normalised
    features. bank, queries: (images (N, 3, H, W) normalised, labels (N,)). __call__(features) with
    features(x, sigma) -> (N, D): `probe_acc` classifies clean queries (at sigma_clean, the level the training views
    sit at) against the clean bank; `probe_acc_noisy` queries noised to sigma_noisy with the fixed `noise`."""

    def __init__(self, bank, queries, noise, sigma_clean, sigma_noisy):
        (self.bank_x, self.bank_y), (self.query_x, self.query_y), self.noise = bank, queries, noise
        self.sigma_clean, self.sigma_noisy = sigma_clean, sigma_noisy
        self.num_classes = int(max(self.bank_y.max(), self.query_y.max())) + 1

    @staticmethod
    @torch.no_grad()
    def _features(features, x, sigma):
        return torch.cat([F.normalize(features(chunk, sigma).float(), dim=-1) for chunk in x.split(256)])

    def _knn(self, query, bank):
        sim, idx = (query @ bank.T).topk(min(20, bank.shape[0]), dim=1)
        votes = torch.zeros(query.shape[0], self.num_classes, device=query.device)
        votes.scatter_add_(1, self.bank_y.to(query.device)[idx], (sim / 0.07).exp())
        return (votes.argmax(1).cpu() == self.query_y).float().mean().item()

    def __call__(self, features):
        bank = self._features(features, self.bank_x, self.sigma_clean)
        clean = self._features(features, self.query_x, self.sigma_clean)
        noisy = self._features(features, self.query_x + self.sigma_noisy * self.noise, self.sigma_noisy)
        return {"probe_acc": round(self._knn(clean, bank), 4), "probe_acc_noisy": round(self._knn(noisy, bank), 4)}
