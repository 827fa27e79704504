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

import pretrain
import rundir
from test_reliability import ENV, ROOT, assert_user_error, cli, load, metrics_steps, one_thread, snapshot  # noqa

PRETRAIN = ["--model", "T", "--image-size", 16, "--batch-size", 4, "--steps", 2, "--device", "cpu", "--log-every", 1,
            "--probe-every", 0]


def unshare_available():
    return subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0


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
def test_a_run_frozen_past_its_lease_stops_without_writing_when_it_wakes(tmp_path):
    """pretrain.py is frozen (SIGSTOP) past its 2 s lease; the same command on host 'other' (no job id) watches the
    lease, takes OUT over and finishes; woken (SIGCONT), the first run stops with one line and exit 2, and
    metrics.jsonl holds each step once."""
    out, steps = tmp_path / "out", 8
    args = [sys.executable, "pretrain.py", *map(str, PRETRAIN + ["--steps", steps, "--ckpt-every", 1, "--out", out])]
    env = {**ENV, "EPG_LOCK_STALE_S": "2"}
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (
            (out / "metrics.jsonl").exists() and len(metrics_steps(out)) >= 2):
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)
    try:
        second = on_other_host(args, {"EPG_LOCK_STALE_S": "2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        _, err2 = second.communicate(timeout=120)
        assert second.returncode == 0 and "taking over the lock of host" in err2, err2[-2000:]
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
    steps = 12
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
