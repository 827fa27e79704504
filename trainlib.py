"""What the three training scripts share: flags and presets, torch.distributed from the torchrun environment, random
streams per step, atomic checkpoints, an output-directory lock, pre-emption, EMA, learning-rate schedules and logs.

Plain functions, no framework, no project imports. Determinism and resume: every random draw of a step comes from
streams seeded by (seed, step, rank), and the data of step k is a function of (seed, k) (data.BatchStream); model,
EMA/momentum, optimiser state and step are in the checkpoint, so a resumed run continues exactly as the
uninterrupted one would have.
"""
import argparse
import atexit
import contextlib
import json
import math
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad flag, incompatible checkpoint, ...): printed as one line, exit code 2."""


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
# Command line: one preset mechanism for every script
# ----------------------------------------------------------------------------------------------------------------
def positive_int(text):
    if int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def positive_float(text):
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return float(text)


def parser(description, config):
    """The flags every training script has, with the script's CONFIG values as defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=config["model"], help="model size: T (tiny, CPU), S, B, L, XL, XXL, G")
    p.add_argument("--data", default=None, help="ImageFolder/ImageNet-layout directory (one subfolder per class); "
                   "none: the embedded data set, generated in code")
    p.add_argument("--image-size", type=positive_int, default=config["image_size"], help="image resolution")
    p.add_argument("--batch-size", type=positive_int, default=config["batch_size"],
                   help="GLOBAL batch size (all processes and accumulation steps together)")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="per-process batch of one forward/backward (gradient accumulation); none: no accumulation")
    p.add_argument("--steps", type=positive_int, default=config["steps"], help="total optimiser steps")
    p.add_argument("--lr", type=positive_float, default=config["lr"], help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=config["weight_decay"], help="AdamW weight decay")
    p.add_argument("--out", default=config["out"], help="output directory; a run in it is resumed")
    p.add_argument("--seed", type=int, default=0, help="seed of every random stream (data order, noise, init)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (none: cuda:LOCAL_RANK if available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every network pass (none: on for CUDA, off for CPU)")
    p.add_argument("--ckpt-every", type=positive_int, default=config["ckpt_every"],
                   help="write OUT/ckpt_last.pt every this many steps (and at the end)")
    p.add_argument("--keep-every", type=int, default=config["keep_every"],
                   help="also keep OUT/ckpt_<step>.pt every this many steps (0: never)")
    p.add_argument("--log-every", type=positive_int, default=config["log_every"],
                   help="append a line to OUT/metrics.jsonl every this many steps")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers per process (none: 0 on CPU; on CUDA the cores per local GPU, at most 16)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip optimiser steps whose loss is NaN/inf instead of stopping (a host sync per step)")
    return p


def parse(p, argv, config, presets):
    """Parse argv after applying presets[--model] (e.g. the CPU overrides of T) as defaults: an explicit flag wins,
    an edit of CONFIG takes effect, and `--model T --help` shows the values a tiny run will use. CONFIG entries
    without a flag become attributes too (and so enter the checkpoint's config)."""
    flags = {action.dest for action in p._actions}
    p.set_defaults(**{k: v for k, v in config.items() if k not in flags})
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=p.get_default("model"))
    p.set_defaults(**presets.get(pre.parse_known_args(argv)[0].model, {}))
    args = p.parse_args(argv)
    for flag in ("keep_every", "num_workers"):
        if (getattr(args, flag) or 0) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0")
    return args


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


def seed_step(seed, step, rank):
    """Seed the global RNGs (CPU and CUDA) from (seed, step, rank): dropout and any other draw of this step become a
    function of the step, so resume needs no saved RNG state."""
    torch.manual_seed(_mix(seed, step, rank, 1))


def step_generator(seed, step, device, stream=0):
    """A generator shared by all ranks for draws over the whole GLOBAL batch (each rank slices its part), so the run
    does not depend on the number of processes. `stream` separates independent uses within a step."""
    return torch.Generator(device=device).manual_seed(_mix(seed, step, stream, 2))


def _mix(*values):
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


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
    leaves the old file or the new one, never a torn one, and no temporary file behind."""
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
                        f"checkpoint (the authors' released weights: python official.py convert {path} OUT.pt)") from None
    if not isinstance(state, dict) or "stage" not in state or "config" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project; if it holds the authors' released weights, "
                        f"convert it first: python official.py convert {path} OUT.pt")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and state["stage"] not in stages:
        raise UserError(f"'{path}' is a {state['stage']} checkpoint, but a {' or '.join(stages)} checkpoint is "
                        f"needed here")
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


def check_resume(saved, current, keys):
    """Refuse to resume when a setting that defines the run differs (nothing is overwritten)."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {current.get(k)} (now)"
             for k in keys if saved.get(k) != current.get(k)]
    if "data_id" in keys and saved.get("data_id") != current.get("data_id"):
        diffs.append("the data set's classes or image count changed")
        diffs = [d for d in diffs if not d.startswith("--data-id")]
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


# ----------------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta over parameters (buffers are copied)."""
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def adamw(model, lr, betas, weight_decay, no_decay=(), device=None):
    """AdamW; parameters whose name ends with one of `no_decay` get no weight decay. Fused kernels on CUDA."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if name.split(".")[-1] in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}] + ([{"params": skip, "weight_decay": 0.0}] if skip else [])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device is not None and device.type == "cuda")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step, total, base_lr, warmup=0):
    """Linear warm-up over `warmup` steps (from 0), then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * step / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def step_lr(step, base_lr, milestones, factors, warmup=0):
    """base_lr until the first milestone, then base_lr * the factor of the last milestone passed (Table 11);
    optional linear warm-up from 0 over `warmup` steps."""
    lr = base_lr
    for milestone, factor in zip(milestones, factors):
        if step >= milestone:
            lr = base_lr * factor
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def grad_norm(model):
    """Global L2 norm of the gradients (a device tensor, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())


def check_finite(value, step, what="loss"):
    """Stop with a clear message when a logged value is NaN/inf (the last good checkpoint is kept)."""
    if not math.isfinite(value):
        raise UserError(f"{what} became {value} at or before step {step}; the run stopped and the last good "
                        f"checkpoint was kept. Lower --lr, check the data, or pass --skip-nonfinite")


# ----------------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------------
class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per line (rank 0 only). On resume, records a killed run wrote beyond the
    checkpoint's step are dropped, so that no step appears twice."""

    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(lines)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Throughput:
    """Images per second between two log points (synchronises the device only when read)."""

    def __init__(self, device):
        self.device, self.t0, self.images = device, time.perf_counter(), 0

    def add(self, n):
        self.images += n

    def rate(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        r, self.t0, self.images = self.images / max(now - self.t0, 1e-9), now, 0
        return r


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def progress(total, initial, enabled, desc):
    """tqdm progress bar with ETA on the main process (a no-op object elsewhere)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)
