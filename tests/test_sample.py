"""Tests of sample.py: the Heun/Euler samplers against the closed-form PF-ODE of Gaussian data, interval CFG and its
evaluation count, per-image seeds, the ADM npz format, DDP sharding and the command-line errors."""
import contextlib
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import losses
import models
import sample
import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny networks here gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waits
    make them many times slower; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def karras_grid(n, shift):
    """Eq. 10 written out independently, times the resolution shift (float64 numpy, descending)."""
    i = np.arange(n, dtype=np.float64)
    return shift * (SIGMA_MAX ** (1 / RHO) + i / (n - 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO


# ----------------------------------------------------------------------------------------------------------------
# (1) Sampler oracle: Gaussian data x0 ~ N(mu, s^2 I) has D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)
# ----------------------------------------------------------------------------------------------------------------
MU, S = 0.3, 0.5


def optimal_denoiser(x, sigma):
    return MU + S * S / (S * S + sigma * sigma) * (x - MU)


def exact_solution(x_T, shift):
    """PF-ODE solution from sigma~_max to sigma~_min: (x - mu) / sqrt(s^2 + sigma^2) is constant along trajectories."""
    hi, lo = shift * SIGMA_MAX, shift * SIGMA_MIN
    return MU + (x_T - MU) * math.sqrt(S * S + lo * lo) / math.sqrt(S * S + hi * hi)


def sampler_errors(sampler, image_size, steps_list=(8, 16, 32, 64)):
    shift = image_size / 64
    errors = []
    for steps in steps_list:
        sigmas = torch.from_numpy(karras_grid(steps, shift))
        x_T = sigmas[0] * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        out = sampler(optimal_denoiser, x_T.clone(), sigmas)
        errors.append((out - exact_solution(x_T, shift)).abs().max().item())
    return errors


@pytest.mark.parametrize("image_size", [32, 64, 256])
def test_heun_converges_at_second_order_to_the_exact_ode_solution(image_size):
    errors = sampler_errors(losses.heun_sample, image_size)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 <= r <= 6.0 for r in ratios), ratios
    assert errors[-1] < 0.02                                         # data std is 0.5


def test_euler_converges_at_first_order():
    errors = sampler_errors(losses.euler_sample, 64)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 <= r <= 2.2 for r in ratios), ratios


def test_heun_matches_the_exact_product_formula_in_float64():
    """With D*, one Heun step multiplies u = x - mu by g_i = 1 + h/2 [a(t_i) + a(t_{i+1}) (1 + h a(t_i))],
    a(sigma) = sigma / (s^2 + sigma^2), h = t_{i+1} - t_i; Euler by 1 + h a(t_i)."""
    a = lambda t: t / (S * S + t * t)
    grid = karras_grid(32, 4.0)
    x_T = grid[0] * torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    heun_gain, euler_gain = 1.0, 1.0
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        heun_gain *= 1 + h / 2 * (a(t) + a(t_next) * (1 + h * a(t)))
        euler_gain *= 1 + h * a(t)
    sigmas = losses.sampling_sigmas(32, 256)
    assert np.allclose(sigmas.numpy(), grid, rtol=1e-14, atol=0)
    heun = losses.heun_sample(optimal_denoiser, x_T.clone(), sigmas)
    euler = losses.euler_sample(optimal_denoiser, x_T.clone(), sigmas)
    assert torch.allclose(heun, MU + (x_T - MU) * heun_gain, rtol=1e-10, atol=1e-12)
    assert torch.allclose(euler, MU + (x_T - MU) * euler_gain, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# (2) Interval classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------
class RecordingNet(torch.nn.Module):
    """A stand-in for EPG: F(x_in, c_noise, y) = tanh(x_in) * 0.4 + offset(y); records (sigma, is_null) per row."""

    def __init__(self, null_label, label_sensitive=True):
        super().__init__()
        self.null_label, self.label_sensitive, self.calls = null_label, label_sensitive, []

    def forward(self, x_in, c_noise, y):
        sigma = torch.exp(c_noise.double() / 250.0)
        self.calls += list(zip(sigma.tolist(), (y == self.null_label).tolist()))
        offset = 0.1 * (y.float() - 2.0) if self.label_sensitive else torch.zeros(len(y))
        return torch.tanh(x_in) * 0.4 + offset.view(-1, 1, 1, 1)


def run_guided_heun(net, cfg_scale, image_size=64, steps=32, batch=3, counter=None):
    shift = image_size / 64
    labels = torch.tensor([0, 1, 2])[:batch]
    denoiser = losses.guided_denoiser(net, labels, net.null_label, shift, cfg_scale, (0.19, 1.61), counter=counter)
    sigmas = losses.sampling_sigmas(steps, image_size)
    x_T = float(sigmas[0]) * torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return losses.heun_sample(denoiser, x_T, sigmas)


def test_guidance_with_identical_cond_and_uncond_equals_no_guidance():
    unguided = run_guided_heun(RecordingNet(10, label_sensitive=False), 1.0)
    guided = run_guided_heun(RecordingNet(10, label_sensitive=False), 3.0)
    assert torch.equal(guided, unguided)


@pytest.mark.parametrize("image_size", [64, 256])
def test_guidance_acts_only_inside_the_interval_and_costs_74_evaluations(image_size):
    net, counter = RecordingNet(10), {}
    run_guided_heun(net, 2.5, image_size=image_size, counter=counter)
    shift = image_size / 64
    grid = karras_grid(32, shift)
    evaluations = list(grid[:-1]) + list(grid[1:])                  # Euler step at t_i, corrector at t_{i+1}
    expected_guided = sorted(t for t in evaluations if 0.19 < t / shift <= 1.61)
    assert len(expected_guided) == 12                               # unshifted 1.609, 1.174, ..., 0.283, twice each
    uncond_calls = [s for s, null in net.calls if null]
    assert len(uncond_calls) == 12 * 3                               # 12 evaluations x 3 images
    assert np.allclose(sorted(set(np.round(uncond_calls, 4))), sorted(set(np.round(expected_guided, 4))), rtol=1e-4)
    assert counter["forwards"] / 3 == 74                            # 62 conditional + 12 unconditional per image


def test_guided_value_is_uncond_plus_scale_times_difference_inside_only():
    net, w, shift = RecordingNet(10), 2.5, 1.0
    labels = torch.tensor([0, 1, 4])
    denoiser = losses.guided_denoiser(net, labels, 10, shift, w, (0.19, 1.61))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for sigma, inside in ((1.0, True), (1.61, True), (0.19, False), (3.0, False)):
        c_in = 1 / math.sqrt(sigma ** 2 + 0.25)
        c_noise = torch.full((3,), 250 * math.log(sigma))
        cond = net(x * c_in, c_noise, labels)
        uncond = net(x * c_in, c_noise, torch.full((3,), 10))
        expected = uncond + w * (cond - uncond) if inside else cond
        assert torch.allclose(denoiser(x, sigma), expected, atol=1e-6), sigma


def test_data_clamp_bounds_each_channel_to_its_valid_range():
    import data
    lo, hi = data.data_range("imagenet")
    x = torch.linspace(-3, 3, 16).view(1, 1, 4, 4).repeat(2, 3, 1, 1)   # every channel spans [-3, 3]
    clamped = losses.clamp_to(x, sample.clamp_range("data", "imagenet"))
    for c in range(3):
        assert clamped[:, c].min() >= lo[c] - 1e-7 and clamped[:, c].max() <= hi[c] + 1e-7
        assert math.isclose(clamped[:, c].max().item(), hi[c].item(), rel_tol=1e-6)
    assert torch.equal(losses.clamp_to(x, sample.clamp_range("official")), x.clamp(-1, 1))


# ----------------------------------------------------------------------------------------------------------------
# (3) Per-image seeds, labels
# ----------------------------------------------------------------------------------------------------------------
def tiny_epg(image_size=16, seed=0):
    torch.manual_seed(seed)
    model = models.build_epg("T", image_size, 10)
    torch.nn.init.normal_(model.out.weight, std=0.05)                 # the zero-initialised output would give D = 0
    for block in model.dec_blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    return model.eval()


def sampler_args(**overrides):
    args = dict(seed=3, clamp="data", sampler="heun", steps=4, cfg_scale=2.0, cfg_interval=[0.19, 1.61],
                mid_sigma=1.526, bounds=sample.clamp_range("data"))
    return SimpleNamespace(**{**args, **overrides})


@pytest.mark.parametrize("sampler,steps", [("heun", 4), ("consistency", 2)])
def test_image_i_is_the_same_at_batch_sizes_1_3_and_8(sampler, steps):
    model = tiny_epg()
    cfg = dict(model="T", image_size=16, num_classes=10, normalize="simple")
    args = sampler_args(sampler=sampler, steps=steps, cfg_scale=2.0 if sampler == "heun" else 1.0)
    labels = sample.class_labels("random", 8, 10, seed=3)
    results = []
    for batch in (1, 3, 8):
        parts = [evaluate.generate(model, cfg, torch.arange(a, min(a + batch, 8)),
                                 labels[a:a + batch], args, torch.device("cpu"), contextlib.nullcontext, {})
                 for a in range(0, 8, batch)]
        results.append(torch.cat(parts))
    assert results[0].std() > 0.05
    scale = results[0].abs().max()            # a random network on a 4-step grid ends far outside the data range
    for other in results[1:]:
        assert (results[0] - other).abs().max() <= 1e-5 * scale


def test_initial_noise_depends_only_on_seed_and_index():
    a = evaluate.initial_noise(7, [0, 1, 2, 3], (3, 4, 4), draws=2)
    b = evaluate.initial_noise(7, [2, 3], (3, 4, 4), draws=2)
    assert torch.equal(a[:, 2:], b)
    assert not torch.equal(a[0], a[1])                                # the second draw is fresh noise
    assert not torch.equal(a, evaluate.initial_noise(8, [0, 1, 2, 3], (3, 4, 4), draws=2))


def test_labels_balanced_random_and_lists():
    balanced = sample.class_labels("balanced", 50, 10)
    assert np.bincount(balanced.numpy(), minlength=10).tolist() == [5] * 10
    assert torch.equal(balanced, balanced.sort().values)
    uneven = np.bincount(sample.class_labels("balanced", 23, 10).numpy(), minlength=10)
    assert uneven.sum() == 23 and uneven.min() == 2 and uneven.max() == 3
    random = sample.class_labels("random", 20_000, 10, seed=1)
    counts = np.bincount(random.numpy(), minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200                # uniform: 2000 +- 4.7 std
    assert sample.class_labels("3,5", 5, 10).tolist() == [3, 5, 3, 5, 3]
    with pytest.raises(rundir.UserError):
        sample.class_labels("12", 5, 10)


# ----------------------------------------------------------------------------------------------------------------
# (4) Command line: ADM npz round trip, PNGs, grid, DDP sharding
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusion_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "dm.pt"
    model = tiny_epg(seed=1)
    config = dict(model="T", image_size=16, num_classes=10, normalize="simple", patch_size=2)
    torch.save({"stage": "diffusion", "config": config, "step": 5, "model": tiny_epg(seed=2).state_dict(),
                "ema": model.state_dict(), "optimizer": {}}, path)
    return str(path), model


def run_sample(*args, env=None):
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_npz_round_trip_in_adm_format(diffusion_ckpt, tmp_path):
    path, model = diffusion_ckpt
    out = tmp_path / "s"
    r = run_sample("--ckpt", path, "--num-samples", 6, "--batch-size", 4, "--steps", 3, "--labels", "balanced",
                   "--out", out, "--png", "--no-progress", "--device", "cpu", "--seed", 4)
    assert r.returncode == 0, r.stderr
    assert "4 network evaluations per image" in r.stdout                # 2 intervals x 2 (Heun), no CFG
    with np.load(out / "samples.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [i * 10 // 6 for i in range(6)]
    # the same images computed here, from the EMA weights, converted as [-1, 1] -> [0, 255]
    args = sampler_args(seed=4, steps=3, cfg_scale=1.0)
    expected = torch.cat([evaluate.generate(model, dict(image_size=16, num_classes=10), idx,
                                          torch.from_numpy(labels)[idx], args, torch.device("cpu"),
                                          contextlib.nullcontext, {})
                          for idx in (torch.arange(0, 4), torch.arange(4, 6))])
    pixels = ((expected.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    assert np.abs(pixels.astype(int) - images.astype(int)).max() <= 1
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{i:06d}.png")), images[i])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] == 6 * 18 + 2                                  # one row per class present


def test_two_processes_give_the_same_samples_as_one(diffusion_ckpt, tmp_path, run_torchrun):
    path, _ = diffusion_ckpt
    common = ["--ckpt", path, "--num-samples", 5, "--batch-size", 2, "--steps", 3, "--cfg-scale", 2.0,
              "--no-progress", "--device", "cpu"]
    one = run_sample(*common, "--out", tmp_path / "one")
    two = run_torchrun(2, "sample.py", *common, "--out", tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(a["arr_1"], b["arr_1"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    assert sorted(os.listdir(tmp_path / "two")) == ["grid.png", "samples.npz", "settings.json"]   # chunks, lock gone


# ----------------------------------------------------------------------------------------------------------------
# (5) Bad inputs: one line on stderr, exit code 2, no traceback
# ----------------------------------------------------------------------------------------------------------------
def cli_error(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["sample.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        rundir.cli_main(sample.main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_exit_2_with_one_line(monkeypatch, capsys, tmp_path, diffusion_ckpt):
    assert "does not exist" in cli_error(monkeypatch, capsys, "--ckpt", tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    assert "corrupt" in cli_error(monkeypatch, capsys, "--ckpt", tmp_path / "bad.pt")
    for n in (0, -3):
        assert "--num-samples" in cli_error(monkeypatch, capsys, "--ckpt", diffusion_ckpt[0], "--num-samples", n)
    assert "consistency" in cli_error(monkeypatch, capsys, "--ckpt", diffusion_ckpt[0], "--sampler", "consistency",
                                      "--out", tmp_path / "o")
    torch.save({"stage": "pretrain", "config": {"model": "T", "image_size": 16}, "step": 0,
                "model": models.build_rcm("T", 16).state_dict()}, tmp_path / "rcm.pt")
    assert "fine-tune it first" in cli_error(monkeypatch, capsys, "--ckpt", tmp_path / "rcm.pt")
