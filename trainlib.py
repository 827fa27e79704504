"""Training infrastructure shared by pretrain.py, train_diffusion.py and train_consistency.py.

Plain functions, no framework: the command-line flags every training script shares, torch.distributed setup from
the torchrun environment, bf16 autocast, per-step random streams, atomic single-file checkpoints, EMA, learning-rate
schedules, and a jsonl metrics log.

Determinism and resume. Every random draw of a training step comes from streams seeded by (seed, step, rank)
(`seed_step`, `step_generator`), and the data of step k is a function of (seed, k) (data.BatchStream). Model,
EMA/momentum weights, optimiser state and step are in the checkpoint; the learning rate, the random streams and the
data position are functions of the step, so a resumed run continues exactly as the uninterrupted one would have.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad flag, incompatible checkpoint, ...): printed as one line, exit code 2."""


def cli_main(main):
    """Run `main()`; user-facing errors become one clear line on stderr and exit code 2, never a traceback."""
    from data import DataError
    try:
        main()
    except (UserError, DataError) as e:
        _close_progress_bars()                     # so that the message starts a line of its own
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _close_progress_bars():
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def common_parser(description, defaults):
    """The flags shared by all training scripts, defaults taken from the script's CONFIG dict (shown by --help)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=defaults["model"], help="model size: T (tiny, CPU), S, B, L, XL, XXL, G")
    p.add_argument("--data", default=None, help="ImageFolder/ImageNet-layout directory (one subfolder per class); "
                   "default: the embedded procedural data set, generated in code")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="image resolution (default: 256, or 32 for --model T)")
    p.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"],
                   help="GLOBAL batch size (all processes and accumulation steps together)")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="per-process batch of one forward/backward; gradient accumulation = "
                   "batch-size / (world size * micro-batch). Default: batch-size / world size (no accumulation)")
    p.add_argument("--steps", type=positive_int, default=defaults["steps"], help="total optimiser steps")
    p.add_argument("--lr", type=positive_float, default=defaults["lr"], help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: per model, paper)")
    p.add_argument("--out", default=defaults["out"],
                   help="output directory; if it holds ckpt_last.pt the run resumes from it")
    p.add_argument("--seed", type=int, default=0, help="seed of every random stream (data order, noise, init)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--ckpt-every", type=positive_int, default=defaults["ckpt_every"],
                   help="write OUT/ckpt_last.pt every this many steps (and at the end)")
    p.add_argument("--keep-every", type=int, default=defaults.get("keep_every", 0),
                   help="also keep OUT/ckpt_<step>.pt every this many steps (0: never)")
    p.add_argument("--log-every", type=positive_int, default=defaults["log_every"],
                   help="append a line to OUT/metrics.jsonl every this many steps")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers per process "
                   "(default: 0 on CPU, 8 on CUDA)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip optimiser steps whose loss is NaN/inf instead of stopping (costs a host sync per step)")
    return p


def resolve_image_size(args):
    if args.image_size is None:
        args.image_size = 32 if args.model == "T" else 256
    return args.image_size


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world > 1


def init_distributed(device_arg=None):
    """Process group from the torchrun environment (NCCL on CUDA, gloo on CPU); plain `python` runs without one.

    The device comes from LOCAL_RANK (never the global rank), so multi-node runs place each process correctly.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError("--device cuda was given but no CUDA device is available; use --device cpu")
            if device.index is None:
                device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, device)


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
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, args, device):
    use = args.compile if args.compile is not None else device.type == "cuda"
    return torch.compile(model) if use else model


def unwrap(model):
    """The plain nn.Module inside DDP and/or torch.compile wrappers (what checkpoints hold)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------------------------
# Random streams
# ----------------------------------------------------------------------------------------------------------------
def _mix(*values):
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def seed_step(seed, step, rank):
    """Re-seed the global RNGs (CPU and every CUDA device) from (seed, step, rank): dropout and any other draw of
    this step become a function of the step, so resume needs no saved RNG state."""
    torch.manual_seed(_mix(seed, step, rank, 1))


def step_generator(seed, step, device, stream=0):
    """A generator shared by all ranks for draws over the whole GLOBAL batch (each rank slices its part), so the
    run does not depend on the number of processes. `stream` separates independent uses within a step."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(seed, step, stream, 2))
    return g


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def check_output_dir(out):
    """Create OUT and make sure it is writable before any training starts."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output directory '{out}' is not writable ({e.strerror}); choose another --out") from None


def save_checkpoint(path, state):
    """Write `state` to `path` atomically: a temporary file in the same directory, fsync, then rename.
    A kill at any moment leaves either the old file or the new one, never a torn one. A kill during the write
    leaves its temporary file `path`.tmp-PID behind; once the new file is in place, such leftovers of earlier
    (killed) writers of `path` are removed (only one process writes a given checkpoint)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint '{path}' ({e.strerror}); free disk space or choose another "
                        f"--out. The previous checkpoint is intact.") from None
    folder, prefix = os.path.dirname(path) or ".", os.path.basename(path) + ".tmp-"
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix):
                os.remove(os.path.join(folder, name))


def load_checkpoint(path, stage=None):
    """Load a checkpoint written by this project (weights_only=True). `stage` ("pretrain", "diffusion",
    "consistency" or a tuple of them) checks that it comes from the expected script."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise UserError(f"checkpoint '{path}' is unreadable or corrupt ({type(e).__name__}); "
                        f"use another checkpoint") from None
    if not isinstance(state, dict) or "stage" not in state or "config" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project (no 'stage'/'config' entries)")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and state["stage"] not in stages:
        raise UserError(f"'{path}' is a {state['stage']} checkpoint, but a {' or '.join(stages)} checkpoint "
                        f"is needed here")
    return state


def check_resume_compatible(saved, current, keys):
    """Refuse to resume when an argument that defines the run differs (nothing is overwritten)."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {current.get(k)} (now)"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise UserError("cannot resume: the output directory holds a run with different settings: "
                        + "; ".join(diffs) + ". Use the same arguments or another --out")


# ----------------------------------------------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema_model, model, decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta over parameters (buffers are copied)."""
    ema_params = [p for p in ema_model.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def adamw(model, lr, betas, weight_decay, no_decay=(), device=None):
    """AdamW; parameters whose name ends with one of `no_decay` get no weight decay. Fused kernels on CUDA."""
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if name.split(".")[-1] in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step, total, base_lr, warmup=0):
    """Linear warm-up over `warmup` steps (from 0), then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def grad_norm(model):
    """Global L2 norm of the gradients (a device tensor, no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class NonFiniteLoss(UserError):
    pass


def check_finite(value, step, what="loss"):
    """Stop with a clear message when a logged value is NaN/inf (the last good checkpoint is kept)."""
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{what} became {value} at or before step {step}; the run stopped and the last good "
                            f"checkpoint was kept. Lower --lr, check the data, or pass --skip-nonfinite")


# ----------------------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl (main process only)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Throughput:
    """Images per second between two log points (synchronises the device only when called)."""

    def __init__(self, device):
        self.device, self.t0, self.images = device, time.perf_counter(), 0

    def add(self, n):
        self.images += n

    def rate(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        r = self.images / max(now - self.t0, 1e-9)
        self.t0, self.images = now, 0
        return r


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0


def progress(total, initial, enabled, desc):
    """tqdm progress bar with ETA on the main process (a no-op object elsewhere)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                mininterval=2.0, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning (train_diffusion.py, train_consistency.py)
# ----------------------------------------------------------------------------------------------------------------
def build_finetune_model(args, num_classes, decoder_dropout=0.0, log=print):
    """EPG-`args.model` for fine-tuning: the encoder from the RCM checkpoint `args.init` (projector dropped, §3.3)
    or random (`args.from_scratch`, the Table 6 ablation); decoder, class embedding and width bridge fresh."""
    import models
    torch.manual_seed(args.seed)
    model = models.build_epg(args.model, args.image_size, num_classes, decoder_dropout)
    if args.from_scratch:
        if args.init:
            raise UserError("--init and --from-scratch exclude each other; pass one of them")
        return model
    if not args.init:
        raise UserError("fine-tuning needs a pre-trained encoder: pass --init OUT/ckpt_last.pt of pretrain.py "
                        "(or --from-scratch for the ablation without pre-training)")
    import official
    if official.is_official_checkpoint(args.init):      # the authors' released RCM (or EPG) weights
        try:
            kind, cfg, rcm_state = official.load_official(args.init, prefer="online", model=args.model,
                                                          image_size=args.image_size)
            if kind != "rcm":
                raise official.OfficialCheckpointError("it is a fine-tuned EPG model, not a pre-trained RCM encoder")
            keys = models.load_encoder_from_rcm(model, rcm_state)
        except (official.OfficialCheckpointError, ValueError) as e:
            raise UserError(f"--init {args.init}: {e}") from None
        log(f"initialised the encoder from the official checkpoint {cfg.get('file', args.init)}: {len(keys)} tensors")
        return model
    state = load_checkpoint(args.init, stage="pretrain")
    cfg = state["config"]
    # EPG-XL/XXL/G share RCM-B's encoder (Table 7): compare the encoders, not the model names
    encoder = lambda name: {k: models.model_config(name)[k] for k in ("depth", "enc_dim", "enc_heads", "tokens_per_side")}
    if cfg.get("model") not in models.MODEL_CONFIGS or encoder(cfg["model"]) != encoder(args.model) \
            or cfg.get("image_size") != args.image_size:
        raise UserError(f"--init {args.init} holds RCM-{cfg.get('model')} at {cfg.get('image_size')}px, whose encoder "
                        f"does not fit EPG-{args.model} at {args.image_size}px; pass a matching --model/--image-size "
                        f"or another checkpoint")
    try:
        keys = models.load_encoder_from_rcm(model, state["model"])
    except ValueError as e:
        raise UserError(f"--init {args.init}: {e}") from None
    log(f"initialised the encoder from {args.init} (step {state['step']}): {len(keys)} tensors")
    return model
