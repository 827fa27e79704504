"""The run directory: what keeps a run's work safe, and what a researcher never needs to edit. Errors that end a run
with one line (UserError, exit 2), the output lock (a lease renewed while the run lives, naming the scheduler's job,
fenced before every write), atomic checkpoints with their sha256 records, resume with fallback to kept checkpoints, and
pre-emption (SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP save, then exit). Imports no project module; trainlib.py (the
training step) imports this one."""
import atexit
import contextlib
import hashlib
import json
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (bad flag, incompatible checkpoint, missing data, ...): one line, exit code 2."""


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be read or does not match the checksum recorded when it was written."""

    def __init__(self, path, why, hint=""):
        super().__init__(f"checkpoint '{path}' {why}{hint}")
        self.why = why


class Preempted(Exception):
    """A stop signal arrived (SIGTERM, SIGINT, SIGUSR1, ...); the run saved what a rerun needs and exits with 128 + the
    signal number."""

    def __init__(self, signum, message):
        super().__init__(f"{signal.Signals(signum).name}: {message}")
        self.code = 128 + signum


def cli_main(main, *user_errors):
    """Run `main()`; UserError (and `user_errors`) become one line on stderr and exit code 2, printed by local rank 0
    only (every rank meets it); the pre-emption message comes from rank 0, which wrote the checkpoint."""
    rank, local_rank = (os.environ.get(key, "0") for key in ("RANK", "LOCAL_RANK"))
    try:
        main()
    except Preempted as e:
        if rank == "0":
            print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except Exception as e:
        if rank != "0" and dist.is_available() and dist.is_initialized() and _peer_gone(e):
            sys.exit(1)                                 # another rank ended (and said why): no traceback here
        if not isinstance(e, (UserError, *user_errors)):
            raise
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()                                 # so that the message starts a line of its own
        if local_rank == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        release_locks()
        for s in STOP_SIGNALS:                                          # as before init_distributed
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()



def _peer_gone(e):
    """Whether `e` is a collective that failed because another process of the group has gone."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                                   "Broken pipe", "gloo", "NCCL"))


def reason(e):
    """What an OSError (or torch.save's RuntimeError for a full disk) says, never "None"."""
    if getattr(e, "strerror", None):
        return e.strerror
    if getattr(e, "errno", None):
        return os.strerror(e.errno)
    return (str(e).splitlines() or [type(e).__name__])[0]


def checked(fn, *args, context=""):
    """fn(*args), its ValueError (a model that does not fit, ...) turned into a UserError with `context`."""
    try:
        return fn(*args)
    except ValueError as e:
        raise UserError(f"{context}{e}") from None



# ---- Output directory, checkpoints, pre-emption ----
LOCK_STALE_S = 300     # a lock whose lease (its mtime, renewed by the live run every fifth of this) is older is stale
_LOCKS = []            # (lock file, "host pid job") of the locks this process holds


def _lock_stale_s():
    return float(os.environ.get("EPG_LOCK_STALE_S", LOCK_STALE_S))          # tests shorten it


def _job_id():
    """The scheduler's id of this job, which a requeue keeps: SLURM_JOB_ID, else torchrun's rendezvous id (--rdzv-id;
    torchrun's default "none" names no job); "-" when there is none."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm:" + os.environ["SLURM_JOB_ID"]
    return "torchrun:" + run_id if run_id and run_id != "none" else "-"


def _holder(lock):
    """(host, pid, job) that `lock` names; ValueError for garbage, OSError when it is unreadable or gone."""
    with open(lock, "rb") as f:
        fields = f.read(4096).decode().split()
    if len(fields) not in (2, 3) or not fields[1].isdigit() or len(fields[1]) > 9:
        raise ValueError(fields)
    return fields[0], int(fields[1]), fields[2] if len(fields) == 3 else "-"


def prepare_output(out, main=True):
    """Create OUT, check that it is writable and take its lock OUT/.lock ("host pid job"), a lease renewed (its mtime)
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
    lock, me = os.path.abspath(os.path.join(out, ".lock")), f"{socket.gethostname()} {os.getpid()} {_job_id()}"
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            _take_over(lock, out)
            try:
                os.remove(lock)                    # a file or a dangling symlink; a new O_EXCL create follows
            except IsADirectoryError:
                raise UserError(f"{lock} is a directory, not a lock file; remove it (rmdir) and rerun") from None
            except FileNotFoundError:
                pass
        except OSError as e:
            raise UserError(f"cannot create the lock {lock} ({e.strerror}); remove it and rerun") from None
    else:
        raise UserError(f"could not take the lock {lock}: other runs keep taking it; is another run starting?")
    os.write(fd, me.encode())
    os.close(fd)
    _LOCKS.append((lock, me))
    if not any(t.name == "output-lock-lease" for t in threading.enumerate()):
        threading.Thread(target=_renew_leases, name="output-lock-lease", daemon=True).start()


def _take_over(lock, out):
    """Return when the lock may be taken over, with a note: a dead pid on this host, the same scheduler job (a requeue,
    on any node), a lease that is stale or is not renewed while we watch it (a run killed on another node, whose job
    is not known), an unreadable file. UserError while a live run holds it."""
    if os.path.isdir(lock) and not os.path.islink(lock):
        raise UserError(f"{lock} is a directory, not a lock file; remove it (rmdir) and rerun")
    try:
        host, pid, job = _holder(lock)
        stamp = os.stat(lock).st_mtime
    except (OSError, ValueError, UnicodeDecodeError):    # empty, garbage (a crash while written), dangling, gone
        print(f"note: taking over the unreadable lock {lock}", file=sys.stderr)
        return
    age, stale, here = time.time() - stamp, _lock_stale_s(), socket.gethostname()
    who = f"host {host}, pid {pid}" + ("" if job == "-" else f", job {job}")
    if host == here and pid == os.getpid():
        return
    if host == here and _alive(pid):
        pass
    elif host == here:
        print(f"note: taking over the lock of a dead run (pid {pid}) in {out}", file=sys.stderr)
        return
    elif job != "-" and job == _job_id():
        print(f"note: taking over the lock of {who} in {out}: the same job, requeued", file=sys.stderr)
        return
    elif age > stale:
        print(f"note: taking over the lock of {who} in {out}: its lease was last renewed {age:.0f} s ago",
              file=sys.stderr)
        return
    else:                                          # another node, another or no job: alive while it renews
        wait = stale - age
        print(f"note: {out} is locked by {who} (lease renewed {age:.0f} s ago); watching its lease for up to "
              f"{wait:.0f} s: taking over unless it is renewed", file=sys.stderr, flush=True)
        deadline = time.time() + wait
        while time.time() < deadline:
            time.sleep(min(1.0, stale / 20))
            try:
                if os.stat(lock).st_mtime != stamp or _holder(lock) != (host, pid, job):
                    break                          # renewed, or taken by another run
            except (OSError, ValueError, UnicodeDecodeError):
                return                             # released (or replaced by garbage)
        else:
            print(f"note: taking over the lock of {who} in {out}: its lease was not renewed for {stale:.0f} s",
                  file=sys.stderr)
            return
        age = time.time() - os.stat(lock).st_mtime if os.path.exists(lock) else 0
    raise UserError(f"'{out}' is in use by another run ({who}, lease renewed {age:.0f} s ago); "
                    f"wait for it to end or choose another --out (a lease is stale after {stale:.0f} s)")


def _holds(lock, me):
    """Whether `lock` still names this process (False once it is gone or unreadable)."""
    with contextlib.suppress(OSError), open(lock, "rb") as f:
        return f.read(4096).strip() == me.encode()
    return False


def fence(path, tmp=None):
    """Before a write under a locked OUT: UserError when OUT's lock no longer names this process (this run was frozen
    past its lease, SLURM suspend or an NFS hang, and another run took OUT over); nothing is written then (our
    temporary file `tmp`, if any, is removed)."""
    path = os.path.abspath(path)
    for lock, me in _LOCKS:
        if path.startswith(os.path.dirname(lock) + os.sep) and not _holds(lock, me):
            try:
                host, pid, job = _holder(lock)
                who = f"host {host}, pid {pid}" + ("" if job == "-" else f", job {job}")
            except (OSError, ValueError, UnicodeDecodeError):
                who = "no run (the lock is gone)"
            if tmp:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            raise UserError(f"this run lost the lock of {os.path.dirname(lock)} (it now names {who}): it was "
                            f"stopped past its lease and another run took over; stopping without writing")


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
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return pid > 0


def _write_synced(path, write, mode="wb"):
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _tmp(path):
    """The temporary name of `path` while this process writes it: host and pid, so that cleanup knows its writer."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def _remove_leftovers(path):
    """Remove the temporary files of `path` that earlier writers killed mid-write left: those of dead pids on this
    host, or older than a lease (a writer on another node is dead by then); never a live writer's."""
    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    with contextlib.suppress(OSError):
        for leftover in os.listdir(folder):
            if not (leftover.startswith(name + ".tmp-") or leftover.startswith(name + ".sha256.tmp-")):
                continue
            host, _, pid = leftover.partition(".tmp-")[2].rpartition("-")
            full = os.path.join(folder, leftover)
            with contextlib.suppress(OSError):
                mine = host == socket.gethostname() and pid.isdigit()
                if (mine and not _alive(int(pid)) or time.time() - os.stat(full).st_mtime > _lock_stale_s()
                        or not host):                  # not host: the old name (pid only)
                    os.remove(full)


def write_atomically(path, write, mode="wb"):
    """write(f) into a temporary file beside `path`, fsync, rename: `path` ends up complete or untouched."""
    fence(path)
    tmp = _tmp(path)
    try:
        _write_synced(tmp, write, mode)
        fence(path, tmp)                           # again: this process may have been frozen while it wrote
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write '{path}' ({reason(e)}); free disk space or choose another --out") from None


def read_json(path, what="file"):
    """The JSON object in `path`; UserError (one line) when it is empty, unreadable or not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path} is unreadable ({reason(e) if isinstance(e, OSError) else 'not JSON'}); "
                        f"delete it and rerun") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds no JSON object; delete it and rerun")
    return obj


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
    tmp = _tmp(path + ".sha256")
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
    fence(path)
    tmp, digest, old = _tmp(path), hashlib.sha256(), _recorded_digests(path)
    try:
        _write_synced(tmp, lambda f: torch.save(state, _Hashing(f, digest)))
        fence(path, tmp)
        if old:
            _record_digests(path, old + [digest.hexdigest()])
        os.replace(tmp, path)
        _record_digests(path, [digest.hexdigest()])
    except (OSError, RuntimeError) as e:           # torch.save's zip writer reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        last = os.path.join(os.path.dirname(path), "ckpt_last.pt")
        kept = ("The previous checkpoint is intact." if os.path.isfile(path) or os.path.isfile(last) else
                "No checkpoint of this run was written yet.")
        raise UserError(f"could not write checkpoint '{path}' ({reason(e)}); free disk space or choose another --out. "
                        f"{kept}") from None
    _remove_leftovers(path)


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
        foreign = isinstance(e, pickle.UnpicklingError)        # a complete file whose pickle is not ours
        raise CorruptCheckpoint(path, f"is unreadable or corrupt ({type(e).__name__})",
                                f"; use another checkpoint (the authors' released weights: python tools/official.py "
                                f"convert {path} OUT.pt)" if foreign else "; it is truncated or damaged: use another "
                                "checkpoint (an OUT/ckpt_<step>.pt of the same run)") from None
    if not isinstance(state, dict) or "stage" not in state or "config" not in state:
        raise UserError(f"'{path}' is not a checkpoint of this project; if it holds the authors' released weights, "
                        f"convert it first: python tools/official.py convert {path} OUT.pt")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and state["stage"] not in stages:
        raise UserError(f"'{path}' is a {state['stage']} checkpoint, but a {' or '.join(stages)} checkpoint is "
                        f"needed here")
    return state


def checkpoint_id(path):
    """What tells one state of a checkpoint file from another: the sha256 that its record names, else its size and
    modification time (e.g. "" for a file that does not exist; load_checkpoint says why)."""
    recorded = _recorded_digests(path)
    if len(recorded) == 1:
        return recorded[0]
    with contextlib.suppress(OSError):
        stat = os.stat(path)
        return f"{stat.st_size}-{stat.st_mtime_ns}"
    return ""


def _file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _copy_checkpoint(src, dst):
    """dst <- src, as save_checkpoint writes (atomic, with its sha256 record): a fallback also repairs ckpt_last.pt."""
    fence(dst)
    tmp, digest = _tmp(dst), hashlib.sha256()
    try:
        with open(src, "rb") as f:                 # in 16 MB pieces: a paper-scale checkpoint is ~10 GB
            _write_synced(tmp, lambda out: [_Hashing(out, digest).write(piece)
                                            for piece in iter(lambda: f.read(1 << 24), b"")])
        _record_digests(dst, _recorded_digests(dst) + [digest.hexdigest()])
        if os.path.islink(dst):
            os.remove(dst)
        os.replace(tmp, dst)
        _record_digests(dst, [digest.hexdigest()])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint '{dst}' ({reason(e)}); free disk space or choose another "
                        f"--out") from None


def resume_state(args, stage, log=print):
    """The checkpoint of the run being resumed, or None for a fresh run: OUT/ckpt_last.pt, or where that file is
    missing, unreadable or corrupt, the newest intact OUT/ckpt_<step>.pt (with a note; rank 0 then rewrites
    ckpt_last.pt from it). A ckpt_last.pt that is a byte copy of a kept checkpoint (a deliberate rollback) is
    accepted as it is. Its "path" says which."""
    last, main = os.path.join(args.out, "ckpt_last.pt"), not dist.is_initialized() or dist.get_rank() == 0
    kept = sorted((name for name in os.listdir(args.out) if re.fullmatch(r"ckpt_\d+\.pt", name)), reverse=True) \
        if os.path.isdir(args.out) else []
    kept = [os.path.join(args.out, name) for name in kept]
    if not os.path.lexists(last) and not kept:
        return None
    why = ("is a dangling symlink" if os.path.islink(last) else "is missing") if not os.path.exists(last) else None
    if why is None and os.path.isfile(last) and _recorded_digests(last):
        digest = _file_digest(last)
        if digest not in _recorded_digests(last):
            copy_of = [path for path in kept if digest in _recorded_digests(path)]
            if copy_of:                            # a rollback: cp ckpt_<step>.pt ckpt_last.pt
                log(f"note: {last} does not match its record {last}.sha256 but is a copy of {copy_of[0]}; resuming "
                    f"from it", file=sys.stderr)
                if main:
                    _record_digests(last, [digest])
            else:
                why = (f"does not match its record {last}.sha256 (if you replaced it on purpose, delete "
                       f"{last}.sha256 to accept it)")
    state = path = None
    if why is None:
        try:
            state, path = load_checkpoint(last, stage), last
        except CorruptCheckpoint as e:
            why = e.why
    if state is None:
        for path in kept:
            with contextlib.suppress(CorruptCheckpoint):
                state = load_checkpoint(path, stage)
                log(f"note: {last} {why}; resuming from {path} (step {state['step']}) instead", file=sys.stderr)
                if main:
                    _copy_checkpoint(path, last)
                break
        else:
            raise UserError(f"cannot resume: {last} {why}, and {args.out} holds no intact ckpt_<step>.pt; restore "
                            f"an intact checkpoint as {last}, or choose another --out") from None
    for key in ("model", "optimizer", "step"):
        if key not in state:
            raise UserError(f"cannot resume: {path} holds no {key!r} entry; restore an intact checkpoint of this run, "
                            f"or choose another --out")
    state["path"] = path
    if state["step"] >= args.steps:
        log(f"{path} is already at step {state['step']} >= --steps {args.steps}; nothing to do")
    return state


def check_space(out, parts):
    """UserError at the start, not at the first --ckpt-every, when OUT's filesystem cannot hold one more checkpoint of
    `parts` (modules: their state; an AdamW optimiser: two moments per trained parameter)."""
    need = 0
    for part in parts.values():
        if isinstance(part, torch.optim.Optimizer):
            need += sum(2 * p.nbytes for group in part.param_groups for p in group["params"] if p.requires_grad)
        elif isinstance(part, torch.nn.Module):
            need += sum(t.nbytes for t in part.state_dict().values() if torch.is_tensor(t))
    try:
        stat = os.statvfs(out)
    except OSError:
        return
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise UserError(f"'{out}' has {free / 2 ** 20:.1f} MB free, but one checkpoint of this run needs about "
                        f"{need / 2 ** 20:.1f} MB; free disk space or choose another --out")


def restore(resume, log, **parts):
    """Load the resumed checkpoint's state dicts into `parts` (key = module or optimiser); -> its step (0 if none).
    First (rank 0, which holds OUT's lock) check that OUT has room for a checkpoint of `parts` (check_space)."""
    for lock, _ in _LOCKS:
        check_space(os.path.dirname(lock), parts)
    if resume is None:
        return 0
    for key, part in parts.items():
        if key not in resume:
            raise UserError(f"cannot resume: {resume['path']} holds no {key!r} entry; restore an intact checkpoint "
                            f"of this run, or choose another --out")
        try:
            part.load_state_dict(resume[key])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot resume: the {key!r} entry of {resume['path']} does not fit this run "
                            f"({str(e).splitlines()[0][:200]})") from None
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


# config keys that identify a network the run depends on by its weights' sha256 (weights_id), not by a path that may
# change: {key: what it is and where it comes from}
IDENTITIES = {"aux_weights": "the auxiliary network W of eq. 9 (--aux-ckpt, else --init)"}


def weights_id(state_dict):
    """sha256 of a state dict's names and tensor bytes: the identity of a network, whatever file it was read from."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if torch.is_tensor(t):
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_resume(saved, current, may_change, steps_fixed=False):
    """Refuse to resume when a config key outside `may_change` differs (and --steps where a schedule depends on it),
    or a network of IDENTITIES is another one than the run was trained with (a key that a checkpoint of an older
    version has no record of is not checked)."""
    for key, what in IDENTITIES.items():
        if saved.get(key) is not None and saved.get(key) != current.get(key):
            raise UserError(f"cannot resume: {what} is not the one this run was trained with (weights sha256 "
                            f"{str(current.get(key))[:12]}, the checkpoint records {saved[key][:12]}); pass the "
                            f"checkpoint the run started with, or use another --out")
    keys = [k for k in current if k not in may_change and k != "data_id" and k not in IDENTITIES] + \
        (["steps"] if steps_fixed else [])
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {current.get(k)} (now)"
             for k in keys if k in saved and saved[k] != current.get(k)]
    if saved.get("data_id") != current.get("data_id"):
        diffs.append("the data set's classes or image count changed")
    elif saved.get("data") != current.get("data"):
        print(f"note: the data path changed ({saved.get('data')} -> {current.get('data')}) but its classes and image "
              f"count did not; resuming", file=sys.stderr)
    if diffs:
        raise UserError("cannot resume: the output directory holds a run with different settings: "
                        + "; ".join(diffs) + ". Use the same arguments or another --out")


_STOP = {"signal": 0}
# what schedulers send before they kill: SIGTERM (SLURM, Kubernetes), SIGINT (Ctrl-C), SIGUSR1/SIGUSR2 (SLURM
# --signal=USR1@120, the common idiom), SIGHUP (a lost terminal, some batch systems); all save and exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def catch_stop_signals(world):
    """From here on the stop signals (STOP_SIGNALS) only set the pre-emption flag (see preempted); under torchrun, a
    CPU (gloo) group lets the ranks agree on it without a device sync per step."""
    if world > 1:
        _STOP["group"] = dist.new_group(backend="gloo")
    _STOP["signal"] = 0
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)


def _on_stop_signal(signum, frame):
    if signum == signal.SIGINT and _STOP["signal"]:
        raise KeyboardInterrupt                    # a second Ctrl-C stops at once
    _STOP["signal"] = _STOP["signal"] or signum


def preempted(env):
    """The number of the stop signal that arrived, else 0. Under DDP the ranks agree every step by an all-reduce of
    a CPU flag (gloo), so that they stop at the same step without synchronising the GPU."""
    if not env.distributed:
        return _STOP["signal"]
    flag = torch.tensor([_STOP["signal"]])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_STOP["group"])
    return int(flag.item())


@contextlib.contextmanager
def stop_on_signal(message):
    """The stop signals (STOP_SIGNALS) raise Preempted(message) at once inside the block: work after the last
    checkpoint that a rerun redoes (end-of-run sampling). One process only."""
    def stop(signum, frame):
        raise Preempted(signum, message)
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def checkpoint(env, args, step, state, save=False):
    """End of a step: OUT/ckpt_last.pt every --ckpt-every steps, at the end, where `save` (before an evaluation) and
    on SIGTERM/SIGINT (then Preempted); OUT/ckpt_<step>.pt every --keep-every steps. `state()` builds the checkpoint
    dict (rank 0 only)."""
    stop = preempted(env)
    last = os.path.join(args.out, "ckpt_last.pt")
    if env.main and (save or step % args.ckpt_every == 0 or step == args.steps or stop):
        save_checkpoint(last, state())
    if env.main and args.keep_every and step % args.keep_every == 0:
        save_checkpoint(os.path.join(args.out, f"ckpt_{step:07d}.pt"), state())
    if stop:
        if env.distributed:                        # no rank leaves before the save is done: torchrun would stop
            dist.barrier(group=_STOP["group"])     # rank 0 within 30 s once another rank has exited
        raise Preempted(stop, f"stopped after step {step}; {last} holds step {step}; rerun to resume")



def append_line(path, line):
    """Append one line to `path`; a failed write (a full disk) is undone, so that no torn line remains."""
    data = (line + "\n").encode()
    fence(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end, done = os.lseek(fd, 0, os.SEEK_END), 0
        while done < len(data):                    # a short write (the disk filled up): the next one says why
            done += os.write(fd, data[done:])
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        raise UserError(f"could not write '{path}' ({reason(e)}); free disk space and rerun the same command: it "
                        f"resumes from its last checkpoint") from None
    finally:
        os.close(fd)
