"""Tests of train_diffusion.py: encoder transfer from an RCM checkpoint, the loss and its weighting against an
independent computation, the EMA relation, bitwise resume after kill -9, and 2 processes == 1 process."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import losses
import models
import sample
import train_diffusion
import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16                                  # EPG-T at 16x16: 8x8 tokens of 2x2 pixels


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from intra-op threads; on a busy 2-core machine OpenMP spin-waits slow them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_rcm(path, image_size=SIZE, seed=0):
    torch.manual_seed(seed)
    rcm = models.build_rcm("T", image_size)
    torch.save({"stage": "pretrain", "config": {"model": "T", "image_size": image_size}, "step": 7,
                "model": rcm.state_dict(), "momentum": rcm.state_dict(), "optimizer": {}}, path)
    return rcm.state_dict()


@pytest.fixture(scope="module")
def rcm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("rcm") / "rcm.pt"
    write_rcm(path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation from the pre-trained encoder (§3.3)
# ----------------------------------------------------------------------------------------------------------------
def run_main(argv):
    rundir.cli_main(lambda: train_diffusion.main([str(a) for a in argv]))


def test_pretrained_encoder_transfers_exactly(tmp_path):
    """One step at lr 1e-30 (AdamW moves each weight by at most 1e-30): the checkpoint's encoder is the RCM's and
    everything else is the fresh seeded initialisation; the projector is gone."""
    rcm_state = write_rcm(tmp_path / "rcm.pt", seed=5)
    run_main(["--model", "T", "--image-size", SIZE, "--batch-size", 2, "--steps", 1, "--lr", 1e-30, "--seed", 3,
              "--init", tmp_path / "rcm.pt", "--out", tmp_path / "out", "--sample-every", 0, "--eval-samples", 0,
              "--grad-clip", 0])
    state = torch.load(tmp_path / "out" / "ckpt_last.pt", weights_only=True)["model"]
    torch.manual_seed(3)
    fresh = models.build_epg("T", SIZE, 10).state_dict()
    encoder_keys = [k for k in state if k.startswith("encoder.")]
    assert encoder_keys and sorted(encoder_keys) == sorted(k for k in rcm_state if k.startswith("encoder."))
    same = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-25)          # noqa: E731
    for k in encoder_keys:
        assert same(state[k], rcm_state[k]), k
    matrices = [k for k in encoder_keys if state[k].dim() >= 2            # random at init: they must differ
                and k != "encoder.pos_embed"]                               # (EPG-T's sin-cos start is not random)
    assert matrices and all(not torch.equal(state[k], fresh[k]) for k in matrices)
    for k in state:                           # decoder, class embedding, output layer: untouched fresh weights
        if not k.startswith("encoder."):
            assert same(state[k], fresh[k]), k
    assert not any("projector" in k for k in state)


def test_pretrained_encoder_of_another_size_is_a_clear_error(tmp_path, capsys):
    write_rcm(tmp_path / "rcm32.pt", image_size=32)
    with pytest.raises(SystemExit) as e:
        run_main(["--model", "T", "--image-size", SIZE, "--init", tmp_path / "rcm32.pt", "--out", tmp_path / "o"])
    assert e.value.code == 2 and "another model size or image size" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Loss and weighting (eq. 1, Table 9) against an independent float64 computation
# ----------------------------------------------------------------------------------------------------------------
def karras(n, i):
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    return (hi + i / (n - 1) * (lo - hi)) ** 7


def test_noise_levels_weights_and_loss_match_an_independent_computation():
    sigma, weight = losses.diffusion_noise(6, torch.Generator().manual_seed(11), -1.2, 1.6)
    # sigma: lognormal(-1.2, 1.6) snapped to the nearest of the 1280 grid points; weight 1 / (t_n - t_{n+1})
    normal = torch.randn(6, generator=torch.Generator().manual_seed(11), dtype=torch.float64).numpy()
    t = np.exp(-1.2 + 1.6 * normal)
    grid = karras(1280, np.arange(1280.0))
    n = np.array([np.argmin(np.abs(grid - v)) for v in t])
    assert np.allclose(sigma.numpy(), grid[n], rtol=1e-6)
    assert np.allclose(weight.numpy(), 1.0 / (karras(1280, n) - karras(1280, n + 1.0)), rtol=1e-5)

    torch.manual_seed(0)
    net = models.build_epg("T", SIZE, 10)
    torch.nn.init.normal_(net.out.weight, std=0.1)                    # otherwise the output is exactly zero
    x0, eps = torch.rand(6, 3, SIZE, SIZE) * 2 - 1, torch.randn(6, 3, SIZE, SIZE)
    y = torch.tensor([0, 3, 10, 5, 9, 10])
    s = SIZE / 64                                                     # resolution shift, Table 9
    loss = losses.diffusion_loss(net, x0, y, s * sigma, weight, eps).mean()

    sig = s * grid[n]
    x_t = x0.double().numpy() + sig[:, None, None, None] * eps.double().numpy()
    c_in = 1 / np.sqrt(sig ** 2 + 0.25)
    with torch.no_grad():
        out = net(torch.from_numpy(c_in[:, None, None, None] * x_t).float(),
                  torch.from_numpy(250 * np.log(sig)).float(), y).double().numpy()
    expected = np.mean(weight.double().numpy() * ((out - x0.double().numpy()) ** 2).reshape(6, -1).mean(axis=1))
    assert math.isclose(loss.item(), expected, rel_tol=1e-4)


def test_paper_model_defaults_are_tables_9_and_11_and_the_tiny_preset_does_not_leak():
    xl = train_diffusion.parse_args(["--model", "XL", "--data", "/data/in256"])
    assert (xl.batch_size, xl.steps, xl.lr, xl.ema, xl.weight_decay, xl.grad_clip) == (1024, 1_000_000, 1e-4, 0.9999,
                                                                                       0.01, 0.5)   # Table 11
    assert (xl.p_mean, xl.p_std, xl.image_size) == (-1.2, 1.6, 256)                                 # Table 9
    assert train_diffusion.parse_args(["--model", "T", "--p-mean", "-1.2"]).p_mean == -1.2          # flag wins
    assert train_diffusion.parse_args(["--model", "T"]).p_std == 1.6


# ----------------------------------------------------------------------------------------------------------------
# Training runs: EMA relation, resume after kill -9, 2 processes == 1 process
# ----------------------------------------------------------------------------------------------------------------
def train_args(rcm, out, steps=4):
    return ["--model", "T", "--image-size", SIZE, "--batch-size", 4, "--steps", steps, "--init", rcm, "--out", out,
            "--ckpt-every", 1, "--keep-every", 1, "--log-every", 1, "--sample-every", 0, "--sample-steps", 2,
            "--eval-samples", 0, "--device", "cpu", "--ema", 0.9, "--lr", 1e-3]


ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def train(*args):
    cmd = [sys.executable, os.path.join(ROOT, "train_diffusion.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(rcm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("dm") / "run"
    r = train(*train_args(rcm_path, out))
    assert r.returncode == 0, r.stderr
    return out


def test_training_runs_logs_and_keeps_the_ema_relation(uninterrupted):
    lines = [json.loads(l) for l in open(uninterrupted / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and all(math.isfinite(l["loss"]) for l in lines)
    assert (uninterrupted / "samples_0000004.png").exists()
    s2, s3 = load(uninterrupted / "ckpt_0000002.pt"), load(uninterrupted / "ckpt_0000003.pt")
    assert s3["stage"] == "diffusion" and s3["step"] == 3 and s3["config"]["normalize"] == "simple"
    changed = 0
    for k, ema3 in s3["ema"].items():                 # theta_ema(3) = 0.9 theta_ema(2) + 0.1 theta(3)
        expected = 0.9 * s2["ema"][k] + 0.1 * s3["model"][k]
        assert torch.allclose(ema3, expected, atol=1e-6, rtol=1e-5), k
        changed += not torch.equal(s2["model"][k], s3["model"][k])
    assert changed > 10                                # the online weights do move


def test_tiny_checkpoints_record_guidance_above_the_papers_interval_and_paper_sizes_keep_it(uninterrupted):
    def resolved(recorded, *flags):
        args = sample.parse_args(["--ckpt", "unused.pt", *flags])
        sample.resolve_sampler(args, "diffusion", recorded)
        return args.cfg_scale, list(args.cfg_interval)

    tiny = load(uninterrupted / "ckpt_last.pt")["config"]["sampling"]
    assert resolved(tiny) == (4.0, [1.61, 80.0])                       # the levels above §4's interval
    assert resolved(tiny, "--cfg-scale", "2", "--cfg-interval", "0.19", "1.61") == (2.0, [0.19, 1.61])  # flags win
    paper = vars(train_diffusion.parse_args(["--model", "XL", "--data", "/data/in256"]))["sampling"]
    assert resolved(paper)[1] == [0.19, 1.61]                          # §4: the interval of Kynkaanniemi et al.


def test_resume_after_kill_equals_uninterrupted_bitwise(rcm_path, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = train_args(rcm_path, out)
    cmd = [sys.executable, os.path.join(ROOT, "train_diffusion.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "ckpt_0000001.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill: resume was not exercised"
    killed_at = load(out / "ckpt_last.pt")["step"]
    assert 1 <= killed_at < 4
    r = train(*args)
    assert r.returncode == 0 and f"at step {killed_at}" in r.stdout, r.stderr
    a, b = load(uninterrupted / "ckpt_last.pt"), load(out / "ckpt_last.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)


def test_changed_settings_refuse_to_resume(rcm_path, uninterrupted, tmp_path, monkeypatch, capsys):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    args = train_args(rcm_path, out, steps=6)
    args[args.index("--batch-size") + 1] = 8
    monkeypatch.setattr(sys, "argv", ["train_diffusion.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        rundir.cli_main(train_diffusion.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "cannot resume" in err and "--batch-size" in err and "\n" not in err
    assert load(out / "ckpt_last.pt")["step"] == 4                     # nothing was overwritten


def test_a_resume_under_changed_code_says_so_in_one_line_and_goes_on(rcm_path, uninterrupted, tmp_path,
                                                                      monkeypatch, capsys):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    recorded = json.load(open(out / "config.json"))["code"]
    assert recorded == load(out / "ckpt_last.pt")["config"]["code"] and len(recorded["sha256"]) == 64
    edited = dict(recorded, sha256="0" * 64)                           # as after an edit of the script
    monkeypatch.setattr(train_diffusion.trainlib, "code_fingerprint", lambda script: edited)
    run_main(train_args(rcm_path, out, steps=5))
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "code differs" in line]
    assert len(notes) == 1 and notes[0].startswith("note:"), captured.err
    assert "data: the embedded shapes (shapes.py), 50000 images, 10 classes" in captured.out   # the start line
    assert load(out / "ckpt_last.pt")["step"] == 5 and json.load(open(out / "config.json"))["code"] == edited


def test_cooldown_decays_the_lr_linearly_to_0_and_fixes_the_step_count(rcm_path, tmp_path, monkeypatch, capsys):
    """--cooldown 4 of 8 steps: step k (from 0) trains at lr 1e-3 * min(1, (8 - k) / 4), logged at step k + 1; the
    end of the decay is a function of --steps, so a resume may not change it."""
    out = tmp_path / "run"
    r = train(*train_args(rcm_path, out, steps=8), "--cooldown", 4)
    assert r.returncode == 0 and "cool-down 4" in r.stdout, r.stderr
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3] * 5 + [7.5e-4, 5e-4, 2.5e-4])
    monkeypatch.setattr(sys, "argv", ["train_diffusion.py", *map(str, train_args(rcm_path, out, steps=10)),
                                      "--cooldown", "4"])
    with pytest.raises(SystemExit) as e:
        rundir.cli_main(train_diffusion.main)
    assert e.value.code == 2 and "--steps 8 (checkpoint) vs 10 (now)" in capsys.readouterr().err


def test_lrd_must_be_in_0_1():
    """Table 13's layer-wise lr decay: 0 would leave the encoder at lr 0 (the authors' 0 means off), so it is
    refused, as is a decay above 1; 1 is off and 0.5 the paper's row."""
    for bad in ("0", "-0.5", "1.5"):
        with pytest.raises(rundir.UserError, match=r"--lrd must be in \(0, 1\]"):
            train_diffusion.parse_args(["--model", "T", "--lrd", bad])
    assert train_diffusion.parse_args(["--model", "T", "--lrd", "0.5"]).lrd == 0.5
    assert train_diffusion.parse_args(["--model", "T"]).lrd == 1.0


def test_two_processes_match_one(rcm_path, uninterrupted, tmp_path, run_torchrun):
    out = tmp_path / "ddp"
    args = train_args(rcm_path, out, steps=2)
    r = run_torchrun(2, "train_diffusion.py", *args)
    assert r.returncode == 0, r.stderr
    a, b = load(uninterrupted / "ckpt_0000002.pt"), load(out / "ckpt_last.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=2e-5, rtol=1e-4), (part, k)
    # Adam's update barely depends on the gradient's scale: the first moments and the logged losses must also agree,
    # so that gradients summed instead of averaged over the ranks fail here
    for i, state in a["optimizer"]["state"].items():
        m1, m2 = state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert torch.linalg.vector_norm(m1 - m2) <= 1e-3 * torch.linalg.vector_norm(m1) + 1e-8, i
    one = [json.loads(l)["loss"] for l in open(uninterrupted / "metrics.jsonl")][:2]
    two = [json.loads(l)["loss"] for l in open(out / "metrics.jsonl")]
    assert np.allclose(one, two, rtol=1e-4)
