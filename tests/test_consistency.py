"""Tests of train_consistency.py: boundary condition, the exact consistency function of Gaussian data, identical
dropout masks in the online and target passes, the auxiliary loss's gradient path, short training runs and
kill/resume determinism. CPU, EPG-T at 16 px."""
import argparse
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
import rundir
import trainlib
import train_consistency as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


def randomize(module, std=0.05, seed=0):
    """Give every parameter random values (the EPG output layer and adaLN gates start at exactly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny networks run fastest on one thread (and do not stall when the cores are shared); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rcm_ckpt(tmp_path_factory):
    """A tiny RCM-T checkpoint in pretrain.py's format (random weights)."""
    torch.manual_seed(0)
    rcm = models.build_rcm("T", SIZE)
    path = str(tmp_path_factory.mktemp("rcm") / "rcm.pt")
    rundir.save_checkpoint(path, {"stage": "pretrain", "config": {"model": "T", "image_size": SIZE,
                                                                    "normalize": "simple"},
                                    "step": 0, "model": rcm.state_dict()})
    return path


# ----------------------------------------------------------------------------------------------------------------
# Parameterisation (eq. 4)
# ----------------------------------------------------------------------------------------------------------------
def test_boundary_condition_is_exact_for_random_epg():
    model = randomize(models.build_epg("T", SIZE, num_classes=10, decoder_dropout=0.5)).train()
    sigma_min = losses.SIGMA_MIN * losses.resolution_shift(SIZE)
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.tensor([0, 3, 9, 10])
    out = losses.consistency_function(model, x, torch.full((4,), sigma_min), y, sigma_min)
    assert torch.equal(out, x)                                     # f(x, sigma~_min) = x bit for bit
    away = losses.consistency_function(model, x, torch.full((4,), 1.0), y, sigma_min)
    assert not torch.allclose(away, x)                             # ... and the network does act elsewhere


# ----------------------------------------------------------------------------------------------------------------
# Gaussian data: the exact consistency function (closed-form PF-ODE solution map)
# ----------------------------------------------------------------------------------------------------------------
MU, STD = 0.3, 0.5
EPS_B = losses.SIGMA_MIN * losses.resolution_shift(SIZE)          # EPG's boundary: s * sigma_min


def exact_f(x, sigma, mu=MU, std=STD, eps_b=EPS_B):
    """f*(x, t) = mu + (x - mu) sqrt(s^2 + eps_b^2) / sqrt(s^2 + t^2): the PF-ODE solution map to eps_b."""
    k = math.sqrt(std ** 2 + eps_b ** 2) / torch.sqrt(std ** 2 + sigma.double() ** 2)
    return mu + (x - mu) * k.view(-1, 1, 1, 1)


def ode_transport_rk4(x, t_from, t_to, steps=400):
    """Integrate dx/dsigma = (x - D*(x; sigma)) / sigma, D* = mu + s^2/(s^2 + sigma^2)(x - mu), by RK4 per sample."""
    def velocity(x, sigma):
        denoised = MU + STD ** 2 / (STD ** 2 + sigma ** 2) * (x - MU)
        return (x - denoised) / sigma
    out = []
    for i in range(x.shape[0]):
        xi, a, b = x[i].double(), float(t_from[i]), float(t_to[i])
        h = (b - a) / steps
        s = a
        for _ in range(steps):
            k1 = velocity(xi, s)
            k2 = velocity(xi + h / 2 * k1, s + h / 2)
            k3 = velocity(xi + h / 2 * k2, s + h / 2)
            k4 = velocity(xi + h * k3, s + h)
            xi, s = xi + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
        out.append(xi)
    return torch.stack(out)


def gaussian_trajectory_pair(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + STD * torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 1.0, 2.5, 10.0, 40.0], dtype=torch.float64)[:batch]
    r = t * torch.tensor([0.1, 0.5, 0.7, 0.9, 0.95, 0.99], dtype=torch.float64)[:batch]
    x_t = x0 + t.view(-1, 1, 1, 1) * eps
    x_r = MU + (x_t - MU) * (torch.sqrt(STD ** 2 + r ** 2) / torch.sqrt(STD ** 2 + t ** 2)).view(-1, 1, 1, 1)
    return x_t, t, x_r, r


def test_gaussian_oracle_trajectory_is_the_pf_ode_solution():
    x_t, t, x_r, r = gaussian_trajectory_pair(batch=3)
    x_small = x_t[:, :, :2, :2]                                      # a few pixels suffice for the ODE check
    assert torch.allclose(ode_transport_rk4(x_small, t, r), x_r[:, :, :2, :2], rtol=0, atol=1e-8)
    assert torch.allclose(exact_f(x_t, t), exact_f(x_r, r), rtol=0, atol=1e-12)   # one trajectory, one end point


def as_network(f, sigma_min=EPS_B, calls=None):
    """The network F whose consistency function (eq. 4) is f: F(c_in x, c(t), y) = (f(x, t) - c_skip x) / c_out,
    with c_in, c(t), c_skip, c_out written out from EDM/Table 9. `calls` collects the values of f."""
    def net(x_in, c_noise, y):
        t = torch.exp(c_noise.double() / 250.0).view(-1, 1, 1, 1)
        x = x_in * torch.sqrt(t ** 2 + 0.25)
        c_skip = 0.25 / ((t - sigma_min) ** 2 + 0.25)
        c_out = (t - sigma_min) * 0.5 / torch.sqrt(t ** 2 + 0.25)
        fx = f(x, t.flatten())
        if calls is not None:
            calls.append(fx)
        return (fx - c_skip * x) / c_out
    return net


def test_exact_consistency_function_gives_zero_loss():
    """Data concentrated at MU (std 0): x0 + t eps and x0 + r eps lie on one PF-ODE trajectory, so the exact map
    f*(x, t) = MU + (x - MU) eps_b / t sends both to the same point and eq. 5 is zero; for another f it is not."""
    _, t, _, r = gaussian_trajectory_pair()
    x0 = torch.full((6, 3, SIZE, SIZE), MU, dtype=torch.float64)
    eps = torch.randn(6, 3, SIZE, SIZE, dtype=torch.float64)
    point = as_network(lambda x, s: exact_f(x, s, std=0.0))
    loss, prediction = losses.consistency_loss(point, point, x0, None, t, r, eps, EPS_B, huber_c=0.06)
    assert loss.shape == (6,) and torch.allclose(prediction, MU + EPS_B * eps)
    assert loss.abs().max() < 1e-6
    gaussian = as_network(exact_f)                                   # the map of data with std 0.5 instead
    loss, _ = losses.consistency_loss(gaussian, gaussian, x0, None, t, r, eps, EPS_B, huber_c=0.06)
    expected = []                                                    # lambda = 1/(t - r), d = S / sqrt(S + c^2)
    for i in range(6):
        delta = (exact_f(x0 + t.view(-1, 1, 1, 1) * eps, t) - exact_f(x0 + r.view(-1, 1, 1, 1) * eps, r))[i]
        squares = float((delta ** 2).sum())
        expected.append(1.0 / float(t[i] - r[i]) * squares / math.sqrt(squares + 0.06 ** 2))
    assert (loss > 0).all() and np.allclose(loss.numpy(), expected, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Dropout masks of the online and the target pass
# ----------------------------------------------------------------------------------------------------------------
def test_online_and_target_passes_see_identical_dropout_masks():
    drop = torch.nn.Dropout(0.5).train()
    calls = []
    probe = as_network(lambda x, s: drop(torch.ones_like(x)) + 0 * x, calls=calls)  # f = the mask itself: 0 or 2
    x0, eps = torch.zeros(4, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 8, 8)
    _, prediction = losses.consistency_loss(probe, probe, x0, None, torch.full((4,), 2.0), torch.ones(4), eps, EPS_B)
    assert len(calls) == 2 and torch.equal(calls[0], calls[1])           # target pass, then online pass
    assert 0.3 < (prediction.abs() < 1e-6).float().mean() < 0.7         # a real mask (0 or 2 per element)
    assert not torch.equal(drop(torch.ones(4, 3, 8, 8)), drop(torch.ones(4, 3, 8, 8)))  # without the fork they differ


def test_dropout_masks_match_in_the_real_network():
    """Same weights, same input, same level: the target pass of the real EPG-T (dropout 0.5, train mode) reproduces
    the online output exactly; two plain passes differ, so dropout is active."""
    model = randomize(models.build_epg("T", SIZE, num_classes=10, decoder_dropout=0.5), seed=1).train()
    calls = []

    def net(x_in, c_noise, y):
        calls.append(model(x_in, c_noise, y))
        return calls[-1]

    y, x0 = torch.tensor([1, 2, 3]), torch.randn(3, 3, SIZE, SIZE)
    sigma = torch.tensor([0.5, 1.0, 3.0])
    _, prediction = losses.consistency_loss(net, net, x0, y, sigma, sigma, torch.randn_like(x0), EPS_B)
    assert torch.equal(calls[0], calls[1].detach())
    assert prediction.requires_grad and not calls[0].requires_grad
    c = losses.c_noise(sigma)
    assert not torch.allclose(model(x0, c, y), model(x0, c, y))


# ----------------------------------------------------------------------------------------------------------------
# Auxiliary loss (eq. 9)
# ----------------------------------------------------------------------------------------------------------------
def test_aux_loss_gradient_reaches_generator_not_w(rcm_ckpt):
    args = argparse.Namespace(aux_weight=1.0, aux_ckpt=None, model="T", image_size=SIZE, aux_features="encoder")
    W = tc.aux_network(args, rundir.load_checkpoint(rcm_ckpt), log=lambda *a: None)
    assert not W.training and not any(p.requires_grad for p in W.parameters())
    generator = randomize(models.build_epg("T", SIZE, num_classes=10, decoder_dropout=0.5), seed=2).train()
    x0 = torch.randn(4, 3, SIZE, SIZE).clamp(-1, 1)
    t = torch.tensor([0.1, 0.5, 2.0, 10.0])
    x_t = x0 + t.view(-1, 1, 1, 1) * torch.randn_like(x0)
    y = torch.tensor([0, 1, 2, 3])
    for kind in ("encoder", "projector"):
        generator.zero_grad()
        prediction = losses.consistency_function(generator, x_t, t, y, EPS_B)
        W_fn = W.features if kind == "encoder" else (lambda x, c: W(x, c)[0])           # noqa: E731
        keys = losses.aux_keys(W_fn, x0, EPS_B)
        loss = losses.aux_loss(W_fn, prediction, keys, t, EPS_B, 0.1, kind, first=0)
        assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
        loss.mean().backward()
        grads = [p.grad for p in generator.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in W.parameters())


def test_aux_loss_is_off_without_pretrained_network():
    args = argparse.Namespace(aux_weight=1.0, aux_ckpt=None, model="T", image_size=SIZE, aux_features="encoder")
    notes = []
    assert tc.aux_network(args, None, log=notes.append) is None
    assert notes and "off" in notes[0]


def test_step_lr_schedule():
    args = tc.parse_args(["--model", "L", "--data", "/data/in256"])                      # Table 11's defaults
    lr = lambda s: trainlib.learning_rate(s, args, 1e-4)                           # noqa: E731
    assert lr(0) == 1e-4 and lr(399_999) == 1e-4
    assert math.isclose(lr(400_000), 3e-5) and math.isclose(lr(499_999), 3e-5)
    assert math.isclose(lr(500_000), 8e-6) and math.isclose(lr(700_000), 8e-6)
    warm = tc.parse_args(["--data", "/data/in256", "--warmup", "10000", "--lr-milestones", "--lr-factors"])
    assert math.isclose(trainlib.learning_rate(2_500, warm, 1e-4), 2.5e-5)


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------
def tiny_args(out, init, steps, *extra):
    return ["--model", "T", "--image-size", str(SIZE), "--batch-size", "4", "--steps", str(steps),
            "--init", init, "--out", str(out), "--log-every", "1", "--lr-milestones", "4", "--lr-factors", "0.3",
            "--stage-interval", "3", "--eval-samples", "0", *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_few_training_steps_are_finite(tmp_path, rcm_ckpt):
    out = tmp_path / "run"
    tc.main(tiny_args(out, rcm_ckpt, 4, "--micro-batch", "2"))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_consistency", "loss_aux", "grad_norm"))
        assert r["loss_aux"] > 0
    state = rundir.load_checkpoint(str(out / "ckpt_last.pt"), stage="consistency")
    assert state["step"] == 4 and set(state) >= {"config", "model", "ema", "optimizer"}
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    init = models.build_epg("T", SIZE, 10)
    models.load_encoder_from_rcm(init, torch.load(rcm_ckpt, weights_only=True)["model"])
    assert not torch.equal(state["model"]["out.weight"], init.state_dict()["out.weight"])   # it trained


def test_cli_misuse_exits_with_code_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        rundir.cli_main(lambda: tc.main(["--model", "T", "--out", str(tmp_path / "x"), "--steps", "1"]))  # no --init
    assert e.value.code == 2


def run_script(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "train_consistency.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_equals_uninterrupted(tmp_path, rcm_ckpt):
    steps = 12
    full, killed = tmp_path / "full", tmp_path / "killed"
    victim = run_script(tiny_args(killed, rcm_ckpt, steps, "--ckpt-every", "3"))
    deadline = time.time() + 120
    while not (killed / "ckpt_last.pt").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(killed / "ckpt_last.pt", weights_only=True)["step"]
    assert 0 < killed_at < steps                                       # really killed mid-run
    tc.main(tiny_args(full, rcm_ckpt, steps, "--ckpt-every", "3"))     # the uninterrupted run, in this process
    resumed = run_script(tiny_args(killed, rcm_ckpt, steps, "--ckpt-every", "3"))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stdout and f"at step {killed_at}" in stdout
    a = torch.load(full / "ckpt_last.pt", weights_only=True)
    b = torch.load(killed / "ckpt_last.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_two_processes_equal_one(tmp_path, rcm_ckpt, run_torchrun):
    """Same global batch on 1 and 2 processes (dropout off: the masks are drawn per rank): same logged losses,
    including the auxiliary NT-Xent whose negatives are gathered over the global batch."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        result = run_torchrun(nproc, "train_consistency.py", *tiny_args(out, rcm_ckpt, 2, "--dropout", "0"))
        assert result.returncode == 0, result.stderr[-2000:]
        runs[nproc] = read_metrics(out)
    for one, two in zip(runs[1], runs[2]):
        for key in ("loss", "loss_consistency", "loss_aux"):
            assert math.isclose(one[key], two[key], rel_tol=1e-4), (key, one, two)
    a, b = (torch.load(tmp_path / f"p{n}" / "ckpt_last.pt", weights_only=True) for n in (1, 2))
    for i, state in a["optimizer"]["state"].items():            # gradients averaged, not summed, over ranks
        m1, m2 = state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert torch.linalg.vector_norm(m1 - m2) <= 1e-3 * torch.linalg.vector_norm(m1) + 1e-8, i


def test_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(tmp_path, rcm_ckpt):
    """--micro-batch 2 (gradient accumulation; the auxiliary NT-Xent's keys are those of the whole batch) against
    no accumulation, dropout off: same logged losses and first moments after two steps."""
    runs = {}
    for name, extra in (("whole", []), ("micro", ["--micro-batch", "2"])):
        tc.main(tiny_args(tmp_path / name, rcm_ckpt, 2, "--dropout", "0", *extra))
        runs[name] = (read_metrics(tmp_path / name), torch.load(tmp_path / name / "ckpt_last.pt", weights_only=True))
    for one, two in zip(runs["whole"][0], runs["micro"][0]):
        for key in ("loss", "loss_consistency", "loss_aux"):
            assert math.isclose(one[key], two[key], rel_tol=1e-5), (key, one, two)
    a, b = runs["whole"][1]["optimizer"]["state"], runs["micro"][1]["optimizer"]["state"]
    for i in a:
        assert torch.linalg.vector_norm(a[i]["exp_avg"] - b[i]["exp_avg"]) <= 1e-4 * torch.linalg.vector_norm(
            a[i]["exp_avg"]) + 1e-9, i


def test_paper_model_defaults_are_tables_9_and_11_and_flags_override_the_noise_proposal():
    args = tc.parse_args(["--model", "L", "--data", "/data/in256"])
    assert (args.batch_size, args.steps, args.lr, args.ema, args.dropout) == (1024, 700_000, 1e-4, 0.9999, 0.5)
    assert tuple(args.betas) == (0.9, 0.99) and tuple(args.lr_milestones) == (400_000, 500_000)   # Table 11
    assert (args.p_mean, args.p_std, args.image_size) == (-0.4, 1.6, 256)                          # Table 9
    tiny = tc.parse_args(["--model", "T", "--p-mean", "2.0", "--p-std", "1.0"])
    assert (tiny.p_mean, tiny.p_std) == (2.0, 1.0)
    assert tiny.lr_milestones == [] and tiny.stage_interval == 100_000
    assert tc.parse_args(["--model", "T", "--steps", "7000", "--lr-milestones", "0.5", "--lr-factors",
                          "0.3"]).lr_milestones == [3500]


def test_init_diffusion_starts_f_theta_from_the_diffusion_ema(tmp_path, rcm_ckpt):
    """ECT's start (make demo): --init-diffusion loads a diffusion checkpoint's EMA weights into f_theta. With the lr
    at zero from step 0, one step leaves the network as loaded: every tensor equals the diffusion EMA's."""
    ema = randomize(models.build_epg("T", SIZE, num_classes=10), seed=3).state_dict()
    dm = str(tmp_path / "dm.pt")
    rundir.save_checkpoint(dm, {"stage": "diffusion", "config": {"model": "T", "image_size": SIZE,
                                                                   "normalize": "simple"},
                                  "step": 7, "model": ema, "ema": ema})
    args = tiny_args(tmp_path / "cm", rcm_ckpt, 1)
    args[args.index("--lr-factors") + 1] = "0"
    args[args.index("--lr-milestones") + 1] = "0"
    tc.main(args + ["--init-diffusion", dm])
    model = rundir.load_checkpoint(str(tmp_path / "cm" / "ckpt_last.pt"), "consistency")["model"]
    assert model.keys() == ema.keys() and all(torch.equal(model[k], ema[k]) for k in ema)


def test_aux_ckpt_passes_on_its_normalisation_and_a_mismatch_is_refused(tmp_path, rcm_ckpt):
    """Table 12a "w/o RCM" (--from-scratch --aux-ckpt): W sees the inputs of its own training, so the run takes the
    auxiliary RCM's normalisation (without --init nothing else names one), and an explicit other one is refused."""
    state = rundir.load_checkpoint(rcm_ckpt)
    imagenet_rcm = str(tmp_path / "rcm_imagenet.pt")
    rundir.save_checkpoint(imagenet_rcm, {**state, "config": {**state["config"], "normalize": "imagenet"}})
    args = tiny_args(tmp_path / "cm", rcm_ckpt, 1)
    args[args.index("--init"):args.index("--init") + 2] = ["--from-scratch", "--aux-ckpt", imagenet_rcm]
    tc.main(args)
    assert json.load(open(tmp_path / "cm" / "config.json"))["normalize"] == "imagenet"
    assert rundir.load_checkpoint(str(tmp_path / "cm" / "ckpt_last.pt"))["config"]["aux_active"]
    args[args.index("--out") + 1] = str(tmp_path / "cm_simple")
    with pytest.raises(rundir.UserError, match="--normalize simple differs from the imagenet of --aux-ckpt"):
        tc.main(args + ["--normalize", "simple"])
