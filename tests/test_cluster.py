"""Cluster round 4: a requeue on any node resumes (the lock names the scheduler's job), the lease is fenced, multi-node
torchrun is run for real, and the faults an independent breaker found. Every test uses the real fault: a second host
name (unshare --uts), a real SIGSTOP/SIGCONT, SIGTERM/SIGUSR1/SIGHUP, a small tmpfs, a real truncated or malformed
file, a bad flag value. Helpers come from test_reliability.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import pretrain
import rundir
from test_reliability import (ENV, ROOT, assert_user_error, cli, files, fill, load, metrics_steps,  # noqa: F401
                              one_thread, small_disk, snapshot)                       # files, one_thread: fixtures

JOB_VARS = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")                # the tests say which job they run in
ENV = {k: v for k, v in ENV.items() if k not in JOB_VARS}


@pytest.fixture(autouse=True)
def no_scheduler_job(monkeypatch):
    """Tests run inside a SLURM job (a CI runner) behave as outside one unless they set a job id themselves."""
    for key in JOB_VARS:
        monkeypatch.delenv(key, raising=False)


PRETRAIN = ["--model", "T", "--image-size", 16, "--batch-size", 4, "--steps", 2, "--device", "cpu", "--log-every", 1,
            "--probe-every", 0]


def unshare_available():
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0
    except OSError:                                              # no unshare binary
        return False


needs_unshare = pytest.mark.skipif(not unshare_available(), reason="a second host name needs unshare --uts (root)")


def on_other_host(cmd, env=None, **kwargs):
    """Popen `cmd` in a second UTS namespace whose host name is 'other' (another node, as far as the code can tell)."""
    return subprocess.Popen(["unshare", "--uts", "sh", "-c", 'hostname other && exec "$@"', "sh", *map(str, cmd)],
                            env={**ENV, **(env or {})}, cwd=ROOT, **kwargs)


# the holder of OUT's lock: takes it, says "locked", and on each line of stdin tries to append a line to OUT/log
HOLDER = """
import sys
sys.path.insert(0, {root!r})
import rundir
rundir.prepare_output({out!r})
print("locked", flush=True)
for _ in sys.stdin:
    try:
        rundir.append_line({out!r} + "/log", "written")
        print("wrote", flush=True)
    except rundir.UserError as e:
        print(e, flush=True)
"""


def holder(out, env):
    proc = on_other_host([sys.executable, "-c", HOLDER.format(root=ROOT, out=str(out))], env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def holder_writes(proc):
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


# ----------------------------------------------------------------------------------------------------------------
# 1. A requeue on another node resumes; an unknown holder is watched; a live one is refused
# ----------------------------------------------------------------------------------------------------------------
def test_job_id_of_the_lock(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")               # torchrun's default: names no job
    assert rundir._job_id() == "-"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "epg7")
    assert rundir._job_id() == "torchrun:epg7"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert rundir._job_id() == "slurm:4242"


@needs_unshare
def test_a_requeue_of_the_same_job_on_another_node_takes_the_lock_over_at_once(tmp_path, monkeypatch, capsys):
    """Job 4242 holds OUT on host 'other' and renews its lease; the same job requeued here (SLURM keeps
    SLURM_JOB_ID) takes it over at once, with one note, long before the lease is stale; the old holder, still alive,
    is fenced: its next write is refused and nothing is written."""
    monkeypatch.setenv("EPG_LOCK_STALE_S", "60")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "out"
    old = holder(out, {"SLURM_JOB_ID": "4242", "EPG_LOCK_STALE_S": "60"})
    try:
        t0 = time.time()
        rundir.prepare_output(str(out))
        assert time.time() - t0 < 5
        err = capsys.readouterr().err
        assert "taking over the lock of host other" in err and "job slurm:4242" in err and "the same job" in err
        assert err.count("\n") == 1
        assert open(out / ".lock").read().split()[1:] == [str(os.getpid()), "slurm:4242"]
        assert "lost the lock" in holder_writes(old)
        assert not (out / "log").exists()
    finally:
        old.kill()
        old.wait()
        rundir.release_locks()


@needs_unshare
def test_an_unknown_holder_on_another_node_is_watched_refused_while_it_renews_taken_over_when_it_does_not(
        tmp_path, monkeypatch, capsys):
    """No job id (or another job's) on host 'other': the lease is watched (the log says so). Alive, it renews: refused
    with the usual line. Frozen (a real SIGSTOP: SLURM suspend, a VM freeze), it does not: taken over with a note once
    its lease is stale; woken up (SIGCONT), it is fenced and writes nothing."""
    monkeypatch.setenv("EPG_LOCK_STALE_S", "2")                  # renewed every 0.4 s
    monkeypatch.setenv("SLURM_JOB_ID", "1")                      # another job than the holder's
    out = tmp_path / "out"
    old = holder(out, {"EPG_LOCK_STALE_S": "2"})
    try:
        before = snapshot(out)
        with pytest.raises(rundir.UserError, match=r"in use by another run \(host other, pid \d+, lease renewed"):
            rundir.prepare_output(str(out))
        assert "watching its lease for up to" in capsys.readouterr().err
        assert snapshot(out) == before
        assert holder_writes(old) == "wrote"
        old.send_signal(signal.SIGSTOP)
        t0 = time.time()
        rundir.prepare_output(str(out))
        assert 0.5 < time.time() - t0 < 6
        err = capsys.readouterr().err
        assert "watching its lease" in err and "its lease was not renewed for 2 s" in err, err
        old.send_signal(signal.SIGCONT)
        assert "lost the lock" in holder_writes(old)
        assert open(out / "log").read() == "written\n"             # the write before the freeze only
        assert open(out / ".lock").read().split()[:2] == [os.uname().nodename, str(os.getpid())]
    finally:
        old.send_signal(signal.SIGCONT)
        old.kill()
        old.wait()
        rundir.release_locks()


def test_a_live_holder_on_this_host_is_refused_also_with_the_same_job(tmp_path, monkeypatch):
    """Two live runs on one OUT are never allowed: a live pid on this host is refused at once, the same job id or
    not."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=ROOT, out=str(out))], env={**ENV},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.UserError, match="in use by another run"):
            rundir.prepare_output(str(out))
        assert holder_writes(proc) == "wrote"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", ["directory", "dangling symlink", "huge pid", "garbage"])
def test_a_malformed_lock_is_one_line_or_taken_over(kind, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".lock"
    if kind == "directory":
        lock.mkdir()
        with pytest.raises(rundir.UserError, match="is a directory, not a lock file"):
            rundir.prepare_output(str(out))
        return
    if kind == "dangling symlink":
        lock.symlink_to(tmp_path / "missing" / "lock")
    elif kind == "huge pid":
        lock.write_text(f"{os.uname().nodename} 99999999999999999999999")
    else:
        lock.write_bytes(b"\xff\xfe")
    try:
        rundir.prepare_output(str(out))
        assert "taking over" in capsys.readouterr().err
        assert not lock.is_symlink() and open(lock).read().split()[1] == str(os.getpid())
    finally:
        rundir.release_locks()


# ----------------------------------------------------------------------------------------------------------------
# Finding 2: a training run frozen past its lease never trains beside its successor
# ----------------------------------------------------------------------------------------------------------------
@needs_unshare
def test_a_run_frozen_past_its_lease_stops_without_writing_when_it_wakes(tmp_path, monkeypatch, capsys):
    """pretrain.py on host 'other' is frozen (SIGSTOP) past its 2 s lease; the same command here (no job id) watches
    the lease, takes OUT over and finishes; woken (SIGCONT), the first run stops with one line and exit 2, and
    metrics.jsonl holds each step once."""
    out, steps = tmp_path / "out", 6
    args = PRETRAIN + ["--steps", steps, "--ckpt-every", 1, "--out", out]
    monkeypatch.setenv("EPG_LOCK_STALE_S", "2")
    first = on_other_host([sys.executable, "pretrain.py", *args], {"EPG_LOCK_STALE_S": "2"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (
            (out / "metrics.jsonl").exists() and len(metrics_steps(out)) >= 2):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        code, _, err = cli(monkeypatch, capsys, pretrain, args)
        assert code == 0 and "taking over the lock of host other" in err, err[-2000:]
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=120)
    assert_user_error(first.returncode, err1, "lost the lock")
    assert metrics_steps(out) == list(range(1, steps + 1))
    assert load(out / "ckpt_last.pt")["step"] == steps


def test_cleanup_removes_only_the_temporary_files_of_dead_writers(tmp_path, monkeypatch):
    """Temporary checkpoint names carry host and pid: a save removes those of dead pids on this host and those older
    than a lease, never a live writer's (this host's live pid, or another node's fresh file)."""
    monkeypatch.setenv("EPG_LOCK_STALE_S", "60")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here, path = os.uname().nodename, tmp_path / "ckpt_last.pt"
    names = {"live": f"ckpt_last.pt.tmp-{here}-{live.pid}", "dead": f"ckpt_last.pt.tmp-{here}-{dead.pid}",
             "other_fresh": "ckpt_last.pt.tmp-other-1", "other_old": "ckpt_last.pt.sha256.tmp-other-2"}
    try:
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        old = time.time() - 120
        os.utime(tmp_path / names["other_old"], (old, old))
        rundir.save_checkpoint(str(path), {"stage": "pretrain", "config": {}, "step": 1})
        left = {kind for kind, name in names.items() if (tmp_path / name).exists()}
        assert left == {"live", "other_fresh"}
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------------------------------------------
# 2. Multi-node: two torchrun agents, a c10d rendezvous on localhost
# ----------------------------------------------------------------------------------------------------------------
LOSSES = ("step", "loss", "loss_ctr", "loss_rc", "lr", "num_scales", "tau_rc", "grad_norm")


def records(out):
    return [{k: r[k] for k in LOSSES} for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def test_two_nodes_equal_one_node_bitwise_and_a_sigterm_to_one_agent_resumes_on_one_process(tmp_path, monkeypatch,
                                                                                            capsys, run_torchrun):
    """pretrain.py under two torchrun agents (--nnodes 2 --nproc_per_node 1, c10d rendezvous on 127.0.0.1; the second
    agent on host 'other' where unshare --uts is available) logs bitwise the losses of one agent with 2 processes;
    a SIGTERM to one agent mid-run saves the step reached (exit 143), no FutureWarning is printed, and the same
    command on one node with one process resumes from that checkpoint and ends where the 2-process run ends."""
    from conftest import free_port
    steps = 8
    args = [*map(str, PRETRAIN + ["--steps", steps, "--ckpt-every", 1000])]
    result = run_torchrun(2, "pretrain.py", *args, "--out", tmp_path / "one_node")
    assert result.returncode == 0, result.stderr[-2000:]
    reference = records(tmp_path / "one_node")
    assert [r["step"] for r in reference] == list(range(1, steps + 1))

    out = tmp_path / "two_nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=epg-two-nodes", "--local-addr=127.0.0.1",
           "pretrain.py", *args, "--out", str(out)]
    env = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    logs = [open(tmp_path / f"agent{i}.log", "w+") for i in (0, 1)]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    if unshare_available():
        agents.append(on_other_host(cmd, {"GLOO_SOCKET_IFNAME": "lo"}, stdout=logs[1], stderr=subprocess.STDOUT))
    else:
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[1], stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(a.poll() is None for a in agents) and not (
                (out / "metrics.jsonl").exists() and len(metrics_steps(out)) >= 3):
            time.sleep(0.01)
        agents[1].send_signal(signal.SIGTERM)                    # one agent, not necessarily rank 0's
        for agent in agents:
            agent.wait(timeout=120)
    finally:
        for agent in agents:
            agent.kill()
    text = "".join(open(f.name).read() for f in logs)
    stopped_at = load(out / "ckpt_last.pt")["step"]
    assert 3 <= stopped_at < steps, text[-3000:]
    assert f"SIGTERM: stopped after step {stopped_at}" in text, text[-3000:]
    assert "FutureWarning" not in text and "Traceback" not in text.split("SIGTERM: stopped")[0], text[-3000:]
    assert records(out) == reference[:stopped_at]                # bitwise: 2 nodes x 1 == 1 node x 2

    code, stdout, err = cli(monkeypatch, capsys, pretrain, args + ["--out", out])
    assert code == 0 and f"resumed from {out}/ckpt_last.pt at step {stopped_at}" in stdout, err[-2000:]
    resumed = records(out)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(resumed[stopped_at:], reference[stopped_at:]):
        for key in ("loss", "loss_ctr", "loss_rc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


# ----------------------------------------------------------------------------------------------------------------
# 3. The breaker's findings
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 6-step pretrain run with ckpt_last.pt and kept ckpt_0000002.pt, ckpt_0000004.pt, ckpt_0000006.pt
    (in-process)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", ["pretrain.py", *map(str, PRETRAIN + ["--steps", 6, "--ckpt-every", 1,
                                                                      "--keep-every", 2, "--out", out])])
        rundir.cli_main(pretrain.main)
    finally:
        mp.undo()
    return out


def copy_run(finished, tmp_path):
    import shutil
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def run_pretrain(monkeypatch, capsys, out, steps, *extra):
    return cli(monkeypatch, capsys, pretrain, PRETRAIN + ["--steps", steps, "--ckpt-every", 1, "--keep-every", 2,
                                                          "--out", out, *extra])


@pytest.mark.parametrize("fault", ["missing", "dangling symlink"])
def test_1_a_missing_last_checkpoint_resumes_from_the_newest_kept_one(fault, finished, tmp_path, monkeypatch, capsys):
    """ckpt_last.pt gone (a scratch purge, a mistaken mv) or a dangling symlink while ckpt_<step>.pt exist: resume from
    the newest intact one with a note, never from step 0; ckpt_last.pt is rewritten from it."""
    out = copy_run(finished, tmp_path)
    os.remove(out / "ckpt_0000006.pt")                           # a run stopped after step 4, then purged
    os.remove(out / "ckpt_last.pt")
    if fault == "dangling symlink":
        os.symlink(tmp_path / "purged" / "ckpt_last.pt", out / "ckpt_last.pt")
    code, stdout, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert code == 0, err[-2000:]
    assert f"ckpt_last.pt {'is missing' if fault == 'missing' else 'is a dangling symlink'}; resuming from " \
           f"{out}/ckpt_0000004.pt (step 4) instead" in err
    assert f"resumed from {out}/ckpt_0000004.pt at step 4" in stdout
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    assert rundir.load_checkpoint(str(out / "ckpt_last.pt"))["step"] == 6


def test_7_a_rollback_by_copy_is_accepted_and_a_replaced_file_is_named_not_called_corrupt(finished, tmp_path,
                                                                                         monkeypatch, capsys):
    """cp ckpt_0000002.pt ckpt_last.pt (the .sha256 beside it is stale): a copy of a kept checkpoint, resumed from
    step 2, not 'fallen back' past the rollback to step 4. A replaced file that is no copy: the message says that it
    does not match its record and how to accept it, never to start afresh."""
    import shutil
    out = copy_run(finished, tmp_path)
    shutil.copy(out / "ckpt_0000002.pt", out / "ckpt_last.pt")
    code, stdout, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert code == 0 and "is a copy of" in err and f"resumed from {out}/ckpt_last.pt at step 2" in stdout, err
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    state = load(out / "ckpt_last.pt")
    torch.save({**state, "step": 3}, out / "ckpt_last.pt")       # edited by hand: no copy of a kept one
    for kept in ("ckpt_0000002.pt", "ckpt_0000004.pt", "ckpt_0000006.pt"):
        os.remove(out / kept)
    code, _, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert_user_error(code, err, f"does not match its record {out}/ckpt_last.pt.sha256 (if you replaced it on "
                                 f"purpose, delete {out}/ckpt_last.pt.sha256 to accept it)")
    assert "afresh" not in err and "official.py" not in err
    os.remove(out / "ckpt_last.pt.sha256")                       # accepted
    code, stdout, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert code == 0 and "at step 3" in stdout, err[-2000:]


def test_8_a_fallback_at_the_final_step_leaves_an_intact_last_checkpoint(finished, tmp_path, monkeypatch, capsys):
    """ckpt_last.pt of a finished run gets a flipped byte; the rerun falls back to ckpt_0000006.pt, has nothing to do,
    and the ckpt_last.pt that 'done' names is intact (rewritten from the fallback)."""
    out = copy_run(finished, tmp_path)
    blob = bytearray((out / "ckpt_last.pt").read_bytes())
    blob[len(blob) // 2] ^= 0x10
    (out / "ckpt_last.pt").write_bytes(blob)
    code, stdout, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert code == 0 and "resuming from" in err and f"done: 6 steps, checkpoint {out}/ckpt_last.pt" in stdout
    assert rundir.load_checkpoint(str(out / "ckpt_last.pt"))["step"] == 6
    assert (out / "ckpt_last.pt").read_bytes() == (out / "ckpt_0000006.pt").read_bytes()


def test_13_malformed_checkpoints_and_logs_are_one_line(finished, files_dm_truncated, tmp_path, monkeypatch, capsys):
    """A checkpoint dict without 'model'; a non-object line in metrics.jsonl (dropped with a note); metrics.jsonl as
    a directory; our own truncated checkpoint's hint does not name the conversion tool."""
    out = copy_run(finished, tmp_path)
    state = load(out / "ckpt_last.pt")
    del state["model"]
    torch.save(state, out / "ckpt_last.pt")
    os.remove(out / "ckpt_last.pt.sha256")
    code, _, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert_user_error(code, err, "holds no 'model' entry")
    import shutil
    shutil.copy(out / "ckpt_0000004.pt", out / "ckpt_last.pt")
    with open(out / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n7\n")
    code, _, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert code == 0 and "dropped 2 unreadable line(s)" in err, err[-2000:]
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    os.remove(out / "metrics.jsonl")
    os.mkdir(out / "metrics.jsonl")
    code, _, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert_user_error(code, err, "metrics.jsonl is a directory")
    with pytest.raises(rundir.UserError) as error:
        rundir.load_checkpoint(files_dm_truncated)
    assert "truncated or damaged" in str(error.value) and "official.py" not in str(error.value)


@pytest.fixture
def files_dm_truncated(finished, tmp_path):
    blob = (finished / "ckpt_0000002.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[:len(blob) // 2])
    return str(tmp_path / "truncated.pt")


def test_6_a_fresh_start_moves_the_old_log_away(finished, tmp_path, monkeypatch, capsys):
    """The checkpoints moved away (the advice of a refused resume) but metrics.jsonl left: the fresh run's log starts
    empty, the old one is kept as metrics.jsonl.old."""
    out = copy_run(finished, tmp_path)
    for name in os.listdir(out):
        if name.startswith("ckpt_"):
            os.remove(out / name)
    code, _, err = run_pretrain(monkeypatch, capsys, out, 2)
    assert code == 0 and "metrics.jsonl.old" in err, err[-2000:]
    assert metrics_steps(out) == [1, 2]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl.old")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP])
def test_3_sigusr1_sigusr2_and_sighup_save_and_exit_like_sigterm(signum, tmp_path, monkeypatch, capsys):
    """#SBATCH --signal=USR1@120: a real SIGUSR1 (or SIGUSR2, SIGHUP) in step 3 saves step 3, releases the lock, exits
    128 + signum; the rerun continues. (Were the signal not handled, the test's own handler fails the test instead of
    the default action killing pytest.)"""
    import trainlib
    out, original = tmp_path / "run", trainlib.Meter.log
    calls = []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return original(*a, **k)

    def unhandled(s, frame):
        raise AssertionError(f"{signal.Signals(s).name} was not handled by the run")
    previous = signal.signal(signum, unhandled)
    try:
        monkeypatch.setattr(trainlib.Meter, "log", signalled)
        code, _, err = run_pretrain(monkeypatch, capsys, out, 6, "--ckpt-every", 100)
        monkeypatch.setattr(trainlib.Meter, "log", original)
    finally:
        signal.signal(signum, previous)
    assert code == 128 + signum, err[-2000:]
    assert f"{signal.Signals(signum).name}: stopped after step 3; {out}/ckpt_last.pt holds step 3" in err
    assert not (out / ".lock").exists()
    code, stdout, err = run_pretrain(monkeypatch, capsys, out, 6)
    assert code == 0 and "at step 3" in stdout, err[-2000:]
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]


def test_5_skip_nonfinite_logs_null_and_a_skipped_count_and_stops_after_max_skipped(tmp_path, monkeypatch, capsys):
    """An lr that makes every step after the first non-finite: windows of skipped steps log null losses and their
    count (valid JSON: no bare NaN), and --max-skipped 3 skipped steps in a row stop the run (exit 2, one line)."""
    out = tmp_path / "run"
    code, _, err = run_pretrain(monkeypatch, capsys, out, 12, "--lr", 1e15, "--skip-nonfinite", "--max-skipped", 3)
    assert_user_error(code, err, "3 steps in a row up to step")

    def strict(value):
        raise AssertionError(f"bare {value} in metrics.jsonl")
    lines = [json.loads(line, parse_constant=strict) for line in open(out / "metrics.jsonl")]
    skipped = [r for r in lines if r.get("skipped")]
    assert skipped and all(r["loss"] is None and r["skipped"] == 1 for r in skipped)
    assert len(lines) < 12 and load(out / "ckpt_last.pt")["step"] < 12


BAD_VALUES = [      # finding 9 (accepted silently) and 10 (tracebacks): (script, flags, the error line says)
    ("pretrain", ["--ctr-weight", 0, "--rc-weight", 0], "not both 0"),
    ("pretrain", ["--rc-weight", -1], "must be >= 0 and not both 0"),
    ("pretrain", ["--ctr-weight", "nan"], "--ctr-weight must be a finite number, got nan"),
    ("pretrain", ["--lr", "inf"], "--lr must be a finite number, got inf"),
    ("pretrain", ["--scales-start", 0], "--scales-start must be positive"),
    ("pretrain", ["--scales-start", 2000, "--scales-end", 1000], "need 1 <= start <= end"),
    ("pretrain", ["--betas", 1.5, 0.9], "--betas must lie in [0, 1)"),
    ("pretrain", ["--seed", 2 ** 70], "--seed must be below 2^63"),
    ("pretrain", ["--batch-size", 1], "at least 2 images per forward"),
    ("pretrain", ["--micro-batch", 1], "at least 2 images per forward"),
    ("pretrain", ["--max-skipped", -1], "--max-skipped must be >= 0"),
    ("diffusion", ["--lrd", 2], "--lrd must be in (0, 1]"),
    ("diffusion", ["--lrd", 0], "--lrd must be in (0, 1]"),
    ("diffusion", ["--freeze-encoder", "--lrd", 0.5], "--freeze-encoder trains no encoder layer"),
    ("consistency", ["--from-scratch", "--init-diffusion", "dm.pt"], "--from-scratch and --init-diffusion exclude"),
    ("consistency", ["--lr-milestones", 10, 5, "--lr-factors", 0.5, 0.1], "--lr-milestones must increase"),
    ("consistency", ["--lr-milestones", -1, "--lr-factors", 0.5], "--lr-milestones and --lr-factors must be >= 0"),
    ("consistency", ["--lr-milestones", 1, "--lr-factors", -0.5], "--lr-factors must be >= 0"),
    ("consistency", ["--aux-weight", -1], "--aux-weight must be >= 0"),
    ("consistency", ["--dropout", "nan"], "--dropout must be"),
    ("sample", ["--cfg-interval", -10, -5], "--cfg-interval LO HI needs 0 <= LO < HI"),
    ("sample", ["--cfg-interval", 5, 1], "--cfg-interval LO HI needs 0 <= LO < HI"),
    ("sample", ["--mid-sigma", 1e9], "--mid-sigma must lie in the sampling range"),
    ("sample", ["--mid-sigma", "nan"], "--mid-sigma must be a finite number"),
    ("sample", ["--steps", 2000000000], "--steps must be at most"),
    ("sample", ["--seed", 2 ** 70], "--seed must be below 2^63"),
]


@pytest.mark.parametrize("name,flags,expected", BAD_VALUES)
def test_9_10_bad_values_are_refused_at_parse_time_in_one_line(name, flags, expected, tmp_path, monkeypatch, capsys):
    import sample
    import train_consistency
    import train_diffusion
    common = ["--model", "T", "--image-size", 16, "--batch-size", 4, "--steps", 2, "--device", "cpu",
              "--out", tmp_path / "out"]
    script, args = {
        "pretrain": (pretrain, common + ["--probe-every", 0]),
        "diffusion": (train_diffusion, common + ["--init", tmp_path / "rcm.pt", "--sample-every", 0]),
        "consistency": (train_consistency, common + ["--init", tmp_path / "rcm.pt", "--eval-samples", 0]),
        "sample": (sample, ["--ckpt", tmp_path / "dm.pt", "--num-samples", 2, "--device", "cpu", "--no-progress",
                            "--out", tmp_path / "out"]),
    }[name]
    code, _, err = cli(monkeypatch, capsys, script, args + flags)
    assert_user_error(code, err, expected)
    assert not (tmp_path / "out").exists()                        # refused before anything is written


# ---- findings 11, 12, 13: sampling after completion, full disks, malformed records ----


def run_sample(monkeypatch, capsys, files, out, *extra):
    import sample
    return cli(monkeypatch, capsys, sample, ["--ckpt", files["dm"], "--num-samples", 2, "--steps", 2, "--device", "cpu",
                                             "--no-progress", "--out", out, *extra])


def test_11_sampling_after_completion_is_already_complete_and_other_settings_never_overwrite(files, tmp_path,
                                                                                          monkeypatch, capsys):
    out = tmp_path / "s"
    code, _, err = run_sample(monkeypatch, capsys, files, out)
    assert code == 0, err[-2000:]
    before = snapshot(out)
    assert "settings.json" in before
    code, stdout, err = run_sample(monkeypatch, capsys, files, out)
    assert code == 0 and "already complete" in stdout, err[-2000:]
    code, _, err = run_sample(monkeypatch, capsys, files, out, "--seed", 1)
    assert_user_error(code, err, "was drawn with other settings")
    assert snapshot(out) == before


def test_13_an_empty_settings_record_is_one_line(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    (out / "chunks").mkdir(parents=True)
    (out / "chunks" / "settings.json").write_text("")
    code, _, err = run_sample(monkeypatch, capsys, files, out)
    assert_user_error(code, err, "settings record")
    assert "unreadable" in err


def test_12_a_disk_smaller_than_one_checkpoint_is_found_at_the_start(tmp_path, monkeypatch, capsys):
    """A real 6 MB tmpfs under a run whose checkpoint needs ~19 MB: one line before the first step, which does not
    claim that a previous checkpoint is intact."""
    with small_disk(tmp_path / "disk", "6m") as disk:
        code, _, err = run_pretrain(monkeypatch, capsys, disk / "run", 4, "--ckpt-every", 100)
        assert_user_error(code, err, "MB free, but one checkpoint of this run needs about")
        assert "intact" not in err and not (disk / "run" / "metrics.jsonl").exists()


def test_12_png_and_chunks_on_a_full_disk_are_one_line_and_no_empty_file(files, tmp_path, monkeypatch, capsys):
    """sample.py --png when the disk fills up after samples.npz: one line naming the reason, no 0-byte PNG under its
    final name; a chunk that meets a full disk names the reason too, never '(None)'."""
    import data
    import sample
    with small_disk(tmp_path / "disk", "8m") as disk:
        grid = data.class_grid

        def grid_then_full(*a, **k):
            grid(*a, **k)
            fill(disk)
        monkeypatch.setattr(data, "class_grid", grid_then_full)
        code, _, err = run_sample(monkeypatch, capsys, files, disk / "s", "--png")
        monkeypatch.setattr(data, "class_grid", grid)
        assert_user_error(code, err, "(No space left on device)")
        images = disk / "s" / "images"
        assert all(os.path.getsize(images / name) > 0 for name in os.listdir(images) if name.endswith(".png"))
        assert not [name for name in os.listdir(images) if ".tmp-" in name]
        os.remove(disk / "filler")
        generate = evaluate.generate

        def full_then_generate(*a, **k):
            fill(disk)
            return generate(*a, **k)
        monkeypatch.setattr(evaluate, "generate", full_then_generate)
        code, _, err = run_sample(monkeypatch, capsys, files, disk / "t")
        assert_user_error(code, err, "(No space left on device)")
        assert "None" not in err


PEER_GONE = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import rundir, trainlib

def main():
    trainlib.init_distributed("cpu")
    if dist.get_rank() == 0:
        raise rundir.UserError("rank 0 stops")
    dist.barrier()
rundir.cli_main(main)
"""


def test_12_when_rank_0_stops_with_one_line_the_other_rank_adds_no_traceback(tmp_path):
    """Two gloo processes; rank 0 ends with a user error while rank 1 waits in a collective: rank 1's collective fails
    (a real lost peer) and it exits quietly, so that the log holds rank 0's one line only."""
    from conftest import free_port
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", PEER_GONE.format(root=ROOT)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": "0"}, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[0].returncode == 2 and errs[0].strip() == "error: rank 0 stops", errs[0]
    assert procs[1].returncode == 1 and "Traceback" not in errs[1], errs[1][-3000:]


def test_4_a_consistency_run_refuses_to_resume_against_another_auxiliary_network(files, tmp_path, monkeypatch,
                                                                                capsys):
    """The pre-training run behind --init moves on (its ckpt_last.pt is replaced by later weights) while a
    consistency run is requeued: its resume is refused in one line instead of training against another W. The same
    W under another path (a copy on scratch) resumes."""
    import shutil
    import models
    import train_consistency
    init = tmp_path / "rcm" / "ckpt_last.pt"
    init.parent.mkdir()
    shutil.copy(files["rcm16"], init)
    args = ["--model", "T", "--image-size", 16, "--batch-size", 4, "--device", "cpu", "--log-every", 1,
            "--ckpt-every", 1, "--eval-samples", 0, "--out", tmp_path / "cm"]
    code, _, err = cli(monkeypatch, capsys, train_consistency, args + ["--steps", 2, "--init", init])
    assert code == 0, err[-2000:]
    before = snapshot(tmp_path / "cm")
    torch.manual_seed(7)                                         # the pre-training run has moved on
    rundir.save_checkpoint(str(init), {"stage": "pretrain", "config": {"model": "T", "image_size": 16,
                                                                       "normalize": "simple"},
                                       "step": 9, "model": models.build_rcm("T", 16).state_dict()})
    code, _, err = cli(monkeypatch, capsys, train_consistency, args + ["--steps", 3, "--init", init])
    assert_user_error(code, err, "the auxiliary network W of eq. 9 (--aux-ckpt, else --init) is not the one")
    assert snapshot(tmp_path / "cm") == before
    code, stdout, err = cli(monkeypatch, capsys, train_consistency, args + ["--steps", 3, "--init", files["rcm16"]])
    assert code == 0 and "at step 2" in stdout, err[-2000:]


def test_11_a_retrained_checkpoint_under_the_same_path_is_not_already_complete(files, tmp_path, monkeypatch,
                                                                               capsys):
    """The run behind --ckpt moved on (its ckpt_last.pt was rewritten): the finished samples.npz is not 'already
    complete' for it; the rerun is refused with what changed."""
    import shutil
    ckpt = tmp_path / "dm" / "ckpt_last.pt"
    ckpt.parent.mkdir()
    shutil.copy(files["dm"], ckpt)
    shutil.copy(files["dm"] + ".sha256", str(ckpt) + ".sha256")
    out, files = tmp_path / "s", {"dm": str(ckpt)}
    code, _, err = run_sample(monkeypatch, capsys, files, out)
    assert code == 0, err[-2000:]
    state = load(ckpt)
    rundir.save_checkpoint(str(ckpt), {**state, "step": state["step"] + 1})
    code, _, err = run_sample(monkeypatch, capsys, files, out)
    assert_user_error(code, err, "was drawn with other settings (the --ckpt file changed)")
