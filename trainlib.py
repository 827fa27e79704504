"""What the three training scripts share (flags from CONFIG, torch.distributed, per-step random streams, the optimiser
step, the metrics log, atomic checkpoints, the output lock, pre-emption); no project imports. A resumed run continues
exactly as the uninterrupted one: every random draw of a step is seeded by (seed, step, rank), the data of step k is a
function of (seed, k), and the checkpoint holds model, EMA/momentum, optimiser state and step."""
import argparse
import atexit
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
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


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be read or does not match the checksum recorded when it was written."""

    def __init__(self, path, why, hint=""):
        super().__init__(f"checkpoint '{path}' {why}{hint}")
        self.why = why


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; the run saved what a rerun needs and exits with 128 + the signal number."""

    def __init__(self, signum, message):
        super().__init__(f"{signal.Signals(signum).name}: {message}")
        self.code = 128 + signum


def cli_main(main, *user_errors):
    """Run `main()`; UserError (and `user_errors`) become one line on stderr and exit code 2, printed by local rank 0
    only (every rank meets it); the pre-emption message comes from rank 0, which wrote the checkpoint."""
    rank, local_rank = (os.environ.get(key, "0") for key in ("RANK", "LOCAL_RANK"))
    try:
        main()
    except (UserError, *user_errors) as e:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()                                 # so that the message starts a line of its own
        if local_rank == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        if rank == "0":
            print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        release_locks()
        signal.signal(signal.SIGINT, signal.default_int_handler)       # as before init_distributed
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---- Command line: every CONFIG key is a flag, its CONFIG comment the help; PRESETS[--model] the one override ----
RUN = dict(                    # flags of every training script that do not change what is learnt
    data=None,                 # ImageFolder/ImageNet-layout directory (one subfolder per class); none: the embedded
                               # data set
    seed=0,                    # seed of every random stream (data order, noise, init)
    micro_batch=None,          # per-process batch of one forward/backward (gradient accumulation); none: no
                               # accumulation
    device=None,               # cpu, cuda, cuda:N; none: cuda:LOCAL_RANK if available
    compile=None,              # torch.compile every network pass; none: on for CUDA, off for CPU
    num_workers=None,          # data loader workers per process; none: 0 on CPU, the cores per local GPU (<= 16) on
                               # CUDA
    skip_nonfinite=False,      # skip optimiser steps whose loss or gradient is NaN/inf instead of stopping (a host
                               # sync per step)
)
RUN_TYPES = dict(micro_batch=int, num_workers=int, compile=bool)
# keys that may change when a run is resumed (paths, cadences, machine); every other CONFIG key must match
MAY_CHANGE = {*RUN.keys() - {"seed"}, "out", "steps", "init", "init_diffusion", "aux_ckpt", "ckpt_every", "keep_every",
              "log_every", "probe_every", "probe_bank", "probe_queries", "sample_every", "sample_steps", "eval_samples"}
POSITIVE = ("image_size", "batch_size", "steps", "lr", "ckpt_every", "log_every", "micro_batch", "sample_steps",
            "probe_bank", "probe_queries", "p_std", "huber_c", "aux_tau", "ctr_tau", "tau1", "tau2", "stage_interval")
NON_NEGATIVE = ("seed", "keep_every", "num_workers", "warmup", "probe_every", "sample_every", "eval_samples",
                "grad_clip", "weight_decay", "proj_dim", "lrd")
FRACTION = ("ema", "momentum", "label_dropout", "dropout")        # in [0, 1)


def config_comments(path, name="CONFIG"):
    """{key: comment} of a file's `NAME = dict(...)` block (keys on a line share it; comment-only lines continue it)."""
    comments, keys, inside = {}, [], False
    with open(path) as f:
        for line in f:
            code, _, comment = line.partition("#")
            if not inside:
                inside = code.strip() == f"{name} = dict("
                continue
            if code.strip() == ")":
                break
            keys = re.findall(r"(\w+)=(?!=)", code) or keys
            for key in keys if comment.strip() else ():
                comments[key] = f"{comments.get(key, '')} {comment.strip()}".strip()
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


def parse(path, config, presets, argv=None, choices=None, types=None):
    """argparse over the script's CONFIG and RUN, with presets[--model] as defaults (an explicit flag wins, and
    `--model T --help` shows the values a tiny run will use); ranges are checked here."""
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
            raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def init_distributed(device_arg=None):
    """init_device, and SIGTERM/SIGINT set the pre-emption flag (see preempted) -> Env."""
    device, (rank, world) = init_device(device_arg), rank_world()
    if world > 1:                                  # a CPU group for the pre-emption flag: no device sync per step
        _STOP["group"] = dist.new_group(backend="gloo")
    _STOP["signal"] = 0
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    return Env(rank, world, int(os.environ.get("LOCAL_RANK", "0")), device)


def num_workers(args, env):
    if args.num_workers is not None or env.device.type != "cuda":
        return args.num_workers or 0
    return max(1, min(16, (os.cpu_count() or 1) // max(torch.cuda.device_count(), 1) - 1))


def split_batch(global_batch, world, micro_batch=None):
    """(per-process batch, micro-batch, accumulation steps) of a global batch."""
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


# ---- Random streams: one seed hasher for the whole repository ----
def mix_seed(*values):
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_step(seed, step, rank):
    """Global RNGs (CPU, CUDA) from (seed, step, rank): dropout becomes a function of the step, no RNG state saved."""
    torch.manual_seed(mix_seed(seed, step, rank, 1))


def step_generator(seed, step, device, stream=0):
    """A generator shared by all ranks for draws over the GLOBAL batch (each rank slices its part), so that the run
    does not depend on the number of processes; `stream` separates the uses within a step."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, stream, 2))


# ---- Output directory, checkpoints, pre-emption ----
LOCK_STALE_S = 300     # a lock whose lease (its mtime, renewed by the live run every fifth of this) is older is stale
_LOCKS = []            # (lock file, "host pid") of the locks this process holds


def _lock_stale_s():
    return float(os.environ.get("EPG_LOCK_STALE_S", LOCK_STALE_S))          # tests shorten it


def prepare_output(out, main=True):
    """Create OUT, check that it is writable and take its lock OUT/.lock ("host pid"), a lease renewed (its mtime)
    while this process lives. Another live run's lock is refused (_take_over). Rank 0 only."""
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
        _take_over(lock, out)
        fd = os.open(lock, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
    os.write(fd, me.encode())
    os.close(fd)
    _LOCKS.append((lock, me))
    if not any(t.name == "output-lock-lease" for t in threading.enumerate()):
        threading.Thread(target=_renew_leases, name="output-lock-lease", daemon=True).start()


def _take_over(lock, out):
    """Return when the lock may be taken over (a dead pid on this host, a stale lease of a run SIGKILLed on another
    node, an unreadable file), with a note; UserError while a live run holds it."""
    try:
        with open(lock) as f:
            host, _, pid = f.read().strip().partition(" ")
        pid, age = int(pid), time.time() - os.stat(lock).st_mtime
    except (OSError, ValueError):                  # empty or garbage (a crash while it was written), or just gone
        print(f"note: taking over the unreadable lock {lock}", file=sys.stderr)
        return
    if host == socket.gethostname() and pid == os.getpid():
        return
    if age > _lock_stale_s():
        print(f"note: taking over the lock of host {host} (pid {pid}) in {out}: its lease was last renewed "
              f"{age:.0f} s ago", file=sys.stderr)
    elif host == socket.gethostname() and not _alive(pid):
        print(f"note: taking over the lock of a dead run (pid {pid}) in {out}", file=sys.stderr)
    else:
        raise UserError(f"'{out}' is in use by another run (host {host}, pid {pid}, lease renewed {age:.0f} s ago); "
                        f"wait for it to end or choose another --out (a lease is stale after {_lock_stale_s():.0f} s)")


def _holds(lock, me):
    """Whether `lock` still names this process (False once it is gone or unreadable)."""
    with contextlib.suppress(OSError), open(lock) as f:
        return f.read().strip() == me
    return False


def _renew_leases():
    while True:
        time.sleep(min(60.0, _lock_stale_s() / 5))
        for lock, me in list(_LOCKS):
            if _holds(lock, me):
                with contextlib.suppress(OSError):
                    os.utime(lock)


@atexit.register
def release_locks():
    while _LOCKS:
        lock, me = _LOCKS.pop()
        if _holds(lock, me):
            with contextlib.suppress(OSError):
                os.remove(lock)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _write_synced(path, write, mode="wb"):
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path, write, mode="wb"):
    """write(f) into a temporary file beside `path`, fsync, rename: `path` ends up complete or untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write_synced(tmp, write, mode)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write '{path}' ({e.strerror}); free disk space or choose another --out") from None


def write_json(path, obj):
    write_atomically(path, lambda f: json.dump(obj, f, indent=1), "w")


class _Hashing:
    """A file for torch.save that hashes what it writes (a checkpoint is not read twice)."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def write(self, data):
        self.digest.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _recorded_digests(path):
    """The sha256 digests that PATH.sha256 records for `path` ([] without one); `sha256sum -c` reads it too."""
    try:
        with open(path + ".sha256") as f:
            return re.findall(r"^([0-9a-f]{64})  ", f.read(), re.M)
    except (OSError, ValueError):
        return []


def _record_digests(path, digests):
    tmp = f"{path}.sha256.tmp-{os.getpid()}"
    _write_synced(tmp, lambda f: f.write("".join(f"{d}  {os.path.basename(path)}\n" for d in digests)), "w")
    os.replace(tmp, path + ".sha256")


def save_checkpoint(path, state):
    """`state` to `path` as write_atomically does (a full disk leaves the old file), with its sha256 in PATH.sha256,
    which names both files while the rename is under way. Weights that became NaN/inf are never written."""
    for name, value in state.items():
        if isinstance(value, dict) and not all(t.isfinite().all() for t in value.values()
                                               if torch.is_tensor(t) and t.is_floating_point()):
            raise UserError(f"the {name} weights became non-finite at or before step {state.get('step')}; the last "
                            f"good checkpoint was kept. Lower --lr, check the data, or pass --skip-nonfinite")
    tmp, digest, old = f"{path}.tmp-{os.getpid()}", hashlib.sha256(), _recorded_digests(path)
    try:
        _write_synced(tmp, lambda f: torch.save(state, _Hashing(f, digest)))
        if old:
            _record_digests(path, old + [digest.hexdigest()])
        os.replace(tmp, path)
        _record_digests(path, [digest.hexdigest()])
    except (OSError, RuntimeError) as e:           # torch.save's zip writer reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not write checkpoint '{path}' ({reason}); free disk space or choose another --out. "
                        f"The previous checkpoint is intact.") from None
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    for leftover in os.listdir(folder):            # of earlier writers that were killed mid-write
        if leftover.startswith(name) and ".tmp-" in leftover:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, leftover))


def load_checkpoint(path, stage=None, mmap=False):
    """A checkpoint of this project (weights_only), checked against its PATH.sha256 if any; `stage`: name or tuple."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint '{path}' is a directory; pass a checkpoint file, e.g. "
                        f"{os.path.join(path, 'ckpt_last.pt')}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    recorded = _recorded_digests(path)
    if recorded:
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() not in recorded:
                raise CorruptCheckpoint(path, f"is corrupt: it does not match the sha256 in {path}.sha256",
                                        "; use another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise CorruptCheckpoint(path, f"is unreadable or corrupt ({type(e).__name__})",
                                f"; use another checkpoint (the authors' released weights: python tools/official.py "
                                f"convert {path} OUT.pt)") from None
    if not isinstance(state, dict) or "stage" not in state or "config" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project; if it holds the authors' released weights, "
                        f"convert it first: python tools/official.py convert {path} OUT.pt")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and state["stage"] not in stages:
        raise UserError(f"'{path}' is a {state['stage']} checkpoint, but a {' or '.join(stages)} checkpoint is "
                        f"needed here")
    return state


def resume_state(args, stage, log=print):
    """The checkpoint of the run being resumed, or None for a fresh run: OUT/ckpt_last.pt, or where that file is
    unreadable or corrupt, the newest intact OUT/ckpt_<step>.pt (with a note). Its "path" says which."""
    last = os.path.join(args.out, "ckpt_last.pt")
    if not os.path.exists(last):
        return None
    kept = sorted((name for name in os.listdir(args.out) if re.fullmatch(r"ckpt_\d+\.pt", name)), reverse=True)
    try:
        state, path = load_checkpoint(last, stage), last
    except CorruptCheckpoint as e:
        for path in (os.path.join(args.out, name) for name in kept):
            with contextlib.suppress(CorruptCheckpoint):
                state = load_checkpoint(path, stage)
                log(f"note: {last} {e.why}; resuming from {path} (step {state['step']}) instead", file=sys.stderr)
                break
        else:
            raise UserError(f"cannot resume: {last} {e.why}, and {args.out} holds no intact ckpt_<step>.pt; move it "
                            f"away to start afresh, or choose another --out") from None
    state["path"] = path
    if state["step"] >= args.steps:
        log(f"{path} is already at step {state['step']} >= --steps {args.steps}; nothing to do")
    return state


def restore(resume, log, **parts):
    """Load the resumed checkpoint's state dicts into `parts` (key = module or optimiser); -> its step (0 if none)."""
    if resume is None:
        return 0
    for key, part in parts.items():
        part.load_state_dict(resume[key])
    log(f"resumed from {resume['path']} at step {resume['step']}")
    return resume["step"]


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
    """Refuse to resume when a config key outside MAY_CHANGE differs (and --steps where a schedule depends on it)."""
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


_STOP = {"signal": 0}


def _on_stop_signal(signum, frame):
    if signum == signal.SIGINT and _STOP["signal"]:
        raise KeyboardInterrupt                    # a second Ctrl-C stops at once
    _STOP["signal"] = _STOP["signal"] or signum


def preempted(env):
    """The number of the SIGTERM/SIGINT that arrived, else 0. Under DDP the ranks agree every step by an all-reduce of
    a CPU flag (gloo), so that they stop at the same step without synchronising the GPU."""
    if not env.distributed:
        return _STOP["signal"]
    flag = torch.tensor([_STOP["signal"]])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_STOP["group"])
    return int(flag.item())


@contextlib.contextmanager
def stop_on_signal(message):
    """SIGTERM and SIGINT raise Preempted(message) at once inside the block: work after the last checkpoint that a
    rerun redoes (end-of-run sampling). One process only."""
    def stop(signum, frame):
        raise Preempted(signum, message)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def checkpoint(env, args, step, state):
    """End of a step: OUT/ckpt_last.pt every --ckpt-every steps, at the end and on SIGTERM/SIGINT (then Preempted);
    OUT/ckpt_<step>.pt every --keep-every steps. `state()` builds the checkpoint dict (rank 0 only)."""
    stop = preempted(env)
    last = os.path.join(args.out, "ckpt_last.pt")
    if env.main and (step % args.ckpt_every == 0 or step == args.steps or stop):
        save_checkpoint(last, state())
    if env.main and args.keep_every and step % args.keep_every == 0:
        save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), state())
    if stop:
        if env.distributed:                        # no rank leaves before the save is done: torchrun would stop
            dist.barrier(group=_STOP["group"])     # rank 0 within 30 s once another rank has exited
        raise Preempted(stop, f"stopped after step {step}; {last} holds step {step}; rerun to resume")


# ---- Optimisation ----
@torch.no_grad()
def ema_update(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta over parameters (buffers are copied)."""
    torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
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
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device is not None and device.type == "cuda")


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
    the factor of the last --lr-milestones passed, Table 11); constant and step take the same linear warm-up."""
    if args.lr_schedule == "cosine":
        return warmup_cosine(step, args.steps, base_lr, args.warmup)
    lr = base_lr
    for milestone, factor in zip(getattr(args, "lr_milestones", ()), getattr(args, "lr_factors", ())):
        if step >= milestone:
            lr = base_lr * factor
    return lr * min(1.0, step / args.warmup) if args.warmup > 0 else lr


class Stepper:
    """step(loss): clip the gradient norm (clip > 0; `.norm` is the norm before), then with --skip-nonfinite skip the
    update when the averaged loss or the norm is NaN/inf (restoring the buffers, e.g. BatchNorm statistics, of the
    step's forwards); True when applied. Otherwise a NaN/inf stops the run at the next log line or checkpoint."""

    def __init__(self, optimizer, model, skip_nonfinite=False, buffers_of=(), log=print):
        self.optimizer, self.model, self.skip, self.log = optimizer, model, skip_nonfinite, log
        self.buffers = [b for m in buffers_of for b in m.buffers()] if skip_nonfinite else []
        self.saved = [b.clone() for b in self.buffers]
        self.norm = None

    def step(self, loss, clip=0.0, step=None):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if clip > 0:
            self.norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:                                      # the same global L2 norm, a device tensor (no host sync)
            grads = [p.grad for p in params if p.grad is not None]
            self.norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
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
        self.t0, self.images = time.perf_counter(), 0
        if env.main and resume_step and os.path.isfile(self.path):
            kept, torn = [], 0
            with open(self.path, "rb") as f:
                for line in filter(bytes.strip, f):
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except ValueError:
                        torn += 1
            if torn:
                print(f"note: dropped {torn} unreadable line(s) of {self.path} (a write cut short)", file=sys.stderr)
            write_atomically(self.path, lambda f: f.writelines(line.rstrip(b"\n") + b"\n" for line in kept))
        self.bar = progress(args.steps, resume_step, env.main, desc)

    def add(self, terms):
        self.sums += terms
        self.count += 1

    def log(self, step, grad_norm=None, **extra):
        """After every step; device tensors among `extra` are read only at the log points (no step waits)."""
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
        """Append one line (rank 0); a failed write (a full disk) is undone, so that no torn line remains."""
        if not self.env.main:
            return
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end, done = os.lseek(fd, 0, os.SEEK_END), 0
            while done < len(line):                # a short write (the disk filled up): the next one says why
                done += os.write(fd, line[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise UserError(f"could not write '{self.path}' ({e.strerror}); free disk space and rerun the same "
                            f"command: it resumes from its last checkpoint") from None
        finally:
            os.close(fd)

    def close(self):
        self.bar.close()


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def progress(total, initial, enabled, desc):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, mininterval=2.0,
                file=sys.stderr)


# ---- kNN probe of an encoder (pre-training's progress) ----
class KnnProbe:
    """Weighted kNN accuracy (k = 20, votes exp(cos / 0.07), as InstDisc/DINO) of features(x, sigma) -> (N, D):
    `probe_acc` of clean queries (at sigma_clean, the level of the training views) against the clean bank,
    `probe_acc_noisy` of queries noised to sigma_noisy with the fixed `noise`. bank, queries: (images, labels)."""

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
