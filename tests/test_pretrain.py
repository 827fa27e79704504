"""pretrain.py end to end on CPU at tiny size (RCM-T at 16x16, global batch 8, a few steps).

Checked against invariants, never against numbers produced by the code itself:
  * 2 processes (torchrun, gloo, global BatchNorm statistics) == 1 process with the same global batch;
  * kill -9 mid-run + rerunning the same command == the uninterrupted run, bitwise;
  * the momentum encoder obeys theta-_k = 0.99 theta-_{k-1} + 0.01 theta_k after every optimiser step;
  * resuming with a different --model is refused (exit code 2) and leaves the checkpoint untouched.
"""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

TINY = ["--model", "T", "--image-size", "16", "--batch-size", "8", "--log-every", "1",
        "--probe-every", "2", "--probe-bank", "20", "--probe-queries", "10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def pretrain_cmd(out, *extra):
    return [sys.executable, os.path.join(ROOT, "pretrain.py"), *TINY, "--out", str(out), *map(str, extra)]


def run(out, *extra, check=True):
    result = subprocess.run(pretrain_cmd(out, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, 3 steps, a checkpoint kept after every step."""
    out = tmp_path_factory.mktemp("pretrain_single")
    run(out, "--steps", 3, "--ckpt-every", 1, "--keep-every", 1)
    return out


def test_two_processes_match_one_process(single_run, tmp_path, run_torchrun):
    out = tmp_path / "ddp"
    result = run_torchrun(2, "pretrain.py", *TINY, "--out", out, "--steps", 3, "--ckpt-every", 1, "--keep-every", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load(single_run / "ckpt_last.pt"), load(out / "ckpt_last.pt")
    assert one["step"] == two["step"] == 3
    # the first step starts from identical weights: its global-batch losses agree to float precision
    logged = [[json.loads(line) for line in open(o / "metrics.jsonl") if '"loss"' in line] for o in (single_run, out)]
    for key in ("loss", "loss_ctr", "loss_rc"):
        assert logged[1][0][key] == pytest.approx(logged[0][0][key], rel=1e-5), key
    # Adam normalises each update to about lr per step (lr = 3.2e-2 * 8 / 1024 = 2.5e-4 here), so float noise in a
    # near-zero gradient can move a single weight by up to one step either way (seen: 2e-4 on 2 of 262144 entries
    # on one CPU): each entry within two steps, and on average within float noise, which a wrong reduction is not
    lr = 3.2e-2 * 8 / 1024
    for key in ("model", "momentum"):
        assert one[key].keys() == two[key].keys()
        for name in one[key]:
            torch.testing.assert_close(two[key][name], one[key][name], rtol=0, atol=2 * lr,
                                       msg=lambda m: f"{key}.{name}: {m}")
            # BatchNorm's running statistics integrate the batch features of every step, float noise included
            # (seen: 1.6e-6 mean on running_mean); a wrong reduction is off by a factor, i.e. by 0.01 or more here
            bound = 1e-5 if name.endswith(("running_mean", "running_var")) else 1e-6
            assert (two[key][name].float() - one[key][name].float()).abs().float().mean() < bound, name
    # AdamW's first moment is the (averaged) gradient history: the global-batch gradients agree as well. After the
    # first step the weights differ by float noise, so single near-zero entries may differ by a few 1e-6; a wrong
    # reduction (a sum instead of the mean, a missing all-reduce) would be off by a factor, i.e. by 50 % or more
    for i, state in one["optimizer"]["state"].items():
        mine, theirs = two["optimizer"]["state"][i]["exp_avg"], state["exp_avg"]
        torch.testing.assert_close(mine, theirs, rtol=1e-2, atol=1e-5)
        assert (mine - theirs).norm() <= 1e-3 * theirs.norm() + 1e-9, i


def test_momentum_encoder_is_an_ema_of_the_online_encoder(single_run):
    records = [json.loads(line) for line in open(single_run / "metrics.jsonl")]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in losses for k in ("loss", "loss_ctr", "loss_rc", "grad_norm"))
    probes = [r for r in records if "probe_acc" in r]
    assert [r["step"] for r in probes] == [0, 2, 3] and all(0 <= r["probe_acc"] <= 1 for r in probes)
    for k in (2, 3):
        before, after = load(single_run / f"ckpt_{k - 1:07d}.pt"), load(single_run / f"ckpt_{k:07d}.pt")
        for name in ("encoder.pos_embed", "encoder.blocks.0.attn.qkv.weight", "projector.0.weight"):
            m0, m1, p1 = before["momentum"][name], after["momentum"][name], after["model"][name]
            torch.testing.assert_close(m1, 0.99 * m0 + 0.01 * p1, rtol=3e-7, atol=1e-7)  # fp32 rounding
            assert not torch.equal(m1, p1)                                  # the momentum copy lags the online one


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    args = ("--steps", 8, "--ckpt-every", 2)
    run(tmp_path / "straight", *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(out, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt_last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()                                                             # SIGKILL: no cleanup at all
    proc.wait()
    assert proc.returncode == -9, "the run ended before it could be killed"
    killed_at = load(out / "ckpt_last.pt")["step"]
    assert killed_at < 8
    run(out, *args)
    a, b = load(tmp_path / "straight" / "ckpt_last.pt"), load(out / "ckpt_last.pt")
    assert a["step"] == b["step"] == 8
    for key in ("model", "momentum"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume from {killed_at}"
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][i][name])), name
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 9))                                      # no duplicated records after resume


def test_resume_with_another_model_is_refused(single_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(single_run, out)
    digest = hashlib.sha256((out / "ckpt_last.pt").read_bytes()).hexdigest()
    mtime = os.stat(out / "ckpt_last.pt").st_mtime_ns
    cmd = pretrain_cmd(out, "--steps", 6)
    cmd[cmd.index("--model") + 1] = "S"
    cmd += ["--data", "shapes"]                                   # other sizes train on the shapes only when asked
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "cannot resume" in result.stderr and "--model T (checkpoint) vs S (now)" in result.stderr
    assert hashlib.sha256((out / "ckpt_last.pt").read_bytes()).hexdigest() == digest
    assert os.stat(out / "ckpt_last.pt").st_mtime_ns == mtime


def test_the_papers_command_without_data_stops_with_one_line(tmp_path):
    """`pretrain.py --model B` without --data would train RCM-B on the embedded toy shapes for 600k steps: it stops
    before anything is written, with exit 2 and one line saying how to point it at ImageNet."""
    out = tmp_path / "rcm_b"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"), "--model", "B", "--out", str(out)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "tools/prepare.py" in result.stderr, result.stderr
    assert "--data shapes" in result.stderr and not out.exists()
