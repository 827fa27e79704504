"""losses.py against closed forms (formulas notes §2, §3, §8), hand-worked values and brute-force computations."""
import math
import os

import pytest
import torch

import losses


# ---------------------------------------------------------------- grid, shift, preconditioning
def test_karras_grid_endpoints_and_monotonicity():
    for n in (2, 21, 1281):
        g = losses.karras_sigmas(n)
        assert g[0].item() == pytest.approx(80.0, rel=1e-12) and g[-1].item() == pytest.approx(0.002, rel=1e-12)
        assert bool((g[1:] < g[:-1]).all())
    # one step past sigma_min on the 1280 grid (value from the reference notes)
    assert losses.karras_sigmas(1280, index=torch.tensor([1280])).item() == pytest.approx(0.0019615, rel=1e-4)


def test_resolution_shift():
    assert losses.resolution_shift(256) == 4 and losses.resolution_shift(512) == 8


def test_consistency_boundary_holds_exactly():
    torch.manual_seed(0)
    s_min = torch.full((4,), 4 * losses.SIGMA_MIN)
    c_skip, c_out = losses.consistency_scalings(s_min, 4 * losses.SIGMA_MIN)
    assert torch.equal(c_skip, torch.ones(4)) and torch.equal(c_out, torch.zeros(4))
    net = lambda x, c, y: torch.randn_like(x) * 100   # any network
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(losses.consistency_function(net, x, s_min, None, 4 * losses.SIGMA_MIN), x)


def gaussian_optimal_denoiser(mu, s):
    """Formulas §8.1: D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), written as a network F(c_in x, c(t), y)."""
    def net(x_in, c_noise, y):
        sigma = torch.exp(c_noise / 250.0).reshape(-1, 1)
        x = x_in * torch.sqrt(sigma ** 2 + 0.25)        # undo c_in
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return net


def test_edm_optimal_denoiser_attains_predicted_minimum():
    # Gaussian data x0 ~ N(mu, s^2): the minimal per-element squared error of x-prediction is the posterior
    # variance s^2 sigma^2 / (s^2 + sigma^2); a perturbed denoiser does worse.
    g = torch.Generator().manual_seed(0)
    mu, s, n, d = 0.3, 0.5, 20000, 8
    net = gaussian_optimal_denoiser(mu, s)
    for sigma_value in (0.01, 0.3, 2.0, 50.0):
        x0 = mu + s * torch.randn(n, d, generator=g, dtype=torch.float64)
        sigma = torch.full((n,), sigma_value, dtype=torch.float64)
        eps = torch.randn(n, d, generator=g, dtype=torch.float64)
        loss = losses.diffusion_loss(net, x0, None, sigma, torch.ones(n), eps).mean().item()
        predicted = s ** 2 * sigma_value ** 2 / (s ** 2 + sigma_value ** 2)
        assert loss == pytest.approx(predicted, rel=0.03)
        shifted = lambda x_in, c, y: net(x_in, c, y) + 0.1 * s                        # noqa: E731
        worse = losses.diffusion_loss(shifted, x0, None, sigma, torch.ones(n), eps).mean().item()
        assert worse > loss
        weighted = losses.diffusion_loss(net, x0, None, sigma, torch.full((n,), 3.0), eps).mean().item()
        assert weighted == pytest.approx(3 * loss, rel=1e-6)                          # the weight multiplies


# ---------------------------------------------------------------- iCT curriculum N(k)
def test_ict_curriculum_hand_values():
    # iCT: K' = floor(600000 / (log2 floor(1280/20) + 1)) = floor(600000 / 7) = 85714;
    # N = min(20 * 2^floor(k/K'), 1280) + 1
    f = lambda k: losses.ict_num_scales(k, 600_000)
    assert [f(0), f(85_713), f(85_714), f(171_428), f(514_284), f(599_999)] == [21, 21, 41, 81, 1281, 1281]
    assert f(428_569) == 321 and f(428_570) == 641   # 20 * 2^5 + 1 = 641 from k = 5 K' = 428,570
    # official: K' = ceil(600000 / log2(65)) = 99,629, ceilings: 21 only at k = 0, 1281 from k = 498,146
    g = lambda k: losses.ict_num_scales(k, 600_000, variant="official")
    assert [g(0), g(1), g(99_629), g(99_630), g(498_145), g(498_146)] == [21, 41, 41, 81, 641, 1281]


def test_rc_noise_pair_is_adjacent_on_grid():
    g = torch.Generator().manual_seed(0)
    s_n, s_next = losses.rc_noise_pair(1000, 41, generator=g)
    grid = losses.karras_sigmas(41).float()
    idx = [(grid - v).abs().argmin().item() for v in s_n]
    assert all(s_next[j] == grid[i + 1] for j, i in enumerate(idx))
    assert max(idx) <= 39 and min(idx) == 0 and len(set(idx)) == 40
    shared_n, _ = losses.rc_noise_pair(16, 41, generator=g, shared=True)
    assert len(set(shared_n.tolist())) == 1


# ---------------------------------------------------------------- temperature schedule
def test_rc_tau_schedule():
    sig = torch.tensor([losses.SIGMA_MIN, losses.SIGMA_MAX])
    K = 600_000
    assert torch.allclose(losses.rc_tau(sig, 0, K), torch.tensor([0.1, 0.2]))
    # tau2 values of the reference notes: 0.162 (100k), 0.129 (200k), 0.108 (300k), 0.1 from 400k
    for k, tau2 in ((100_000, 0.162), (200_000, 0.129), (300_000, 0.108), (400_000, 0.1), (599_999, 0.1)):
        assert losses.rc_tau(sig, k, K)[1].item() == pytest.approx(tau2, abs=1e-3)
    mid = torch.tensor([40.001])   # t = 0.5 exactly -> average of tau1 and tau2
    assert losses.rc_tau(mid, 0, K).item() == pytest.approx(0.15, abs=1e-6)
    assert torch.equal(losses.rc_tau(sig, 0, K, schedule="constant"), torch.tensor([0.1, 0.1]))


# ---------------------------------------------------------------- NT-Xent
def brute_force_nt_xent(q, k, tau):
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    out = []
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ k[j]) / tau) for j in range(len(k)) if j != i)
        out.append(-math.log(pos / (pos + neg)))
    return torch.tensor(out)


def test_nt_xent_equals_brute_force_loop():
    torch.manual_seed(0)
    q, k = torch.randn(7, 5), torch.randn(7, 5)
    assert torch.allclose(losses.nt_xent(q, k, 0.2), brute_force_nt_xent(q, k, 0.2).float(), atol=1e-5)


def test_nt_xent_orthonormal_oracle():
    # formulas §8.4: orthonormal embeddings, positives = anchors: CE = -1/tau + ln(e^(1/tau) + N - 1)
    N, tau = 6, 0.2
    e = torch.eye(N)
    expected = -1 / tau + math.log(math.exp(1 / tau) + N - 1)
    assert torch.allclose(losses.nt_xent(e, e, tau), torch.full((N,), expected))


def test_nt_xent_gradient_check_and_stop_gradient_on_keys():
    torch.manual_seed(0)
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    # gradcheck in float64 through an fp64 re-implementation of the normalisation path (the loss computes in fp32,
    # so compare autograd of the loss with finite differences at fp32 tolerance instead)
    loss = losses.nt_xent(q, k, 0.5).sum()
    loss.backward()
    assert k.grad is None or torch.count_nonzero(k.grad) == 0
    eps = 1e-3
    num = torch.zeros_like(q)
    for i in range(5):
        for j in range(4):
            qp, qm = q.detach().clone(), q.detach().clone()
            qp[i, j] += eps
            qm[i, j] -= eps
            plus, minus = (brute_force_nt_xent(v, k.detach(), 0.5).sum() for v in (qp, qm))
            num[i, j] = (plus - minus) / (2 * eps)
    assert torch.allclose(q.grad, num, atol=1e-3)


def test_per_sample_temperature():
    torch.manual_seed(0)
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    taus = torch.tensor([0.1, 0.2, 0.3, 0.4])
    got = losses.nt_xent(q, k, taus)
    for i, tau in enumerate(taus.tolist()):
        assert got[i].item() == pytest.approx(brute_force_nt_xent(q, k, tau)[i].item(), abs=1e-5)


def test_nt_xent_distributed_equals_single_process(tmp_path, run_torchrun):
    """torchrun --nproc_per_node=2 (gloo, CPU): gathered loss and DDP-averaged gradients equal one process on the
    concatenated batch."""
    out = tmp_path / "result.pt"
    result = run_torchrun(2, os.path.join("tests", "dist_nt_xent_worker.py"), out, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    res = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    q = torch.randn(8, 6, requires_grad=True)
    k = torch.randn(8, 6)
    loss = losses.nt_xent(q, k, 0.2).mean()
    loss.backward()
    assert res["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(res["grad"], q.grad, atol=1e-7)


def test_micro_batches_see_the_keys_of_the_whole_batch():
    """Queries split into micro-batches with the whole batch's keys (global_keys + first) give exactly the loss and
    gradient of the whole batch at once (eq. 8/9 with micro-batching)."""
    torch.manual_seed(0)
    q = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 5)
    whole = losses.nt_xent(q, k, 0.2)
    whole.sum().backward()
    grad, q.grad = q.grad.clone(), None
    keys = losses.global_keys(k)
    parts = [losses.nt_xent(q[a:a + 2], keys, 0.2, first=a) for a in range(0, 8, 2)]
    torch.cat(parts).sum().backward()
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)
    assert torch.allclose(q.grad, grad, atol=1e-6)
    brute = brute_force_nt_xent(q.detach()[2:4].float(), k, 0.2)          # rows 2, 3 against all 8 keys
    assert torch.allclose(parts[1].float(), torch.tensor([brute_force_nt_xent(q.detach().float(), k, 0.2)[i]
                                                          for i in (2, 3)]), atol=1e-5)
    assert not torch.allclose(parts[1].float(), brute, atol=1e-3)           # 2 keys only would be another loss


class ToyRCM(torch.nn.Module):
    """A stand-in for models.RCM with the same interface: features = a linear map of the pooled input plus the
    time input, projector = a linear layer."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.projector = torch.nn.Linear(4, 3)

    def features(self, x, c_noise):
        return self.lin(x.mean(dim=(2, 3))) + c_noise[:, None] / 1000


def test_rcm_loss_is_eq_8_written_out():
    """rcm_loss + rcm_keys against eq. 8 computed by hand from the networks with the brute-force NT-Xent."""
    import models
    torch.manual_seed(0)
    online, momentum = ToyRCM(), ToyRCM()
    b, s0 = 5, 0.5 * losses.SIGMA_MIN
    x, y1, y2, eps = (torch.randn(b, 3, 4, 4) for _ in range(4))
    sigma_n, sigma_next = torch.rand(b) * 5 + 1, torch.rand(b)
    tau = torch.full((b,), 0.15)
    keys = losses.rcm_keys(models.RCMViews(momentum), online.features, x, y1, y2, eps, sigma_next, s0)
    ctr, rc = losses.rcm_loss(models.RCMViews(online, with_rest=True), keys, x, y1, y2, eps, sigma_n, s0, tau, 0.2,
                              first=0)

    def enc(net, images, sigma):                   # E(c_in x, c(sigma)) of images noised with eps at levels sigma
        sigma = torch.as_tensor(sigma).expand(b)
        noisy = images + sigma.view(-1, 1, 1, 1) * eps
        return net.features(noisy / torch.sqrt(sigma ** 2 + 0.25).view(-1, 1, 1, 1), 250 * torch.log(sigma))

    with torch.no_grad():
        q1, q2 = (online.projector(enc(online, y, s0)) for y in (y1, y2))
        k1, k2 = (momentum.projector(enc(momentum, y, s0)) for y in (y1, y2))
        h_n, h_next = enc(online, x, sigma_n), enc(online, x, sigma_next)
    expected_ctr = brute_force_nt_xent(q1, k2, 0.2) + brute_force_nt_xent(q2, k1, 0.2)
    assert torch.allclose(ctr.detach(), expected_ctr, atol=1e-4)
    assert torch.allclose(rc.detach(), brute_force_nt_xent(h_n, h_next, 0.15), atol=1e-4)


def test_consistency_loss_is_eq_5_written_out():
    """consistency_loss against lambda(t, r) * pseudo-Huber(f(x0 + t eps, t), f(x0 + r eps, r)) computed by hand
    from eq. 4 with EDM's scalings, for a network F that is a fixed nonlinear map."""
    torch.manual_seed(0)
    sigma_min = 4 * losses.SIGMA_MIN
    F = lambda x_in, c, y: torch.tanh(x_in) * (1 + c[:, None, None, None] / 1000)       # noqa: E731
    x0, eps = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.randn(4, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 3.0, 40.0], dtype=torch.float64)
    r = t * 0.8
    loss, prediction = losses.consistency_loss(F, F, x0, None, t, r, eps, sigma_min, huber_c=0.06)

    def f(x, sigma):
        c_skip = 0.25 / ((sigma - sigma_min) ** 2 + 0.25)
        c_out = (sigma - sigma_min) * 0.5 / math.sqrt(sigma ** 2 + 0.25)
        return c_skip * x + c_out * torch.tanh(x / math.sqrt(sigma ** 2 + 0.25)) * (1 + 250 * math.log(sigma) / 1000)
    for i in range(4):
        a, b_ = f(x0[i] + float(t[i]) * eps[i], float(t[i])), f(x0[i] + float(r[i]) * eps[i], float(r[i]))
        S = float(((a - b_) ** 2).sum())
        assert loss[i].item() == pytest.approx(S / math.sqrt(S + 0.0036) / float(t[i] - r[i]), rel=1e-5)
        assert torch.allclose(prediction[i], a)


# ---------------------------------------------------------------- diffusion fine-tuning
def test_diffusion_noise_snaps_to_grid_with_weight():
    g = torch.Generator().manual_seed(0)
    sigma, w = losses.diffusion_noise(5000, generator=g)
    grid = losses.karras_sigmas(1280)
    # every sigma is a grid point; weight = 1/(t_n - t_{n+1}) computed independently from eq. 10
    for s_val, w_val in list(zip(sigma.tolist(), w.tolist()))[:200]:
        i = (grid - s_val).abs().argmin().item()
        assert abs(grid[i].item() - s_val) < 1e-5 * s_val
        lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
        nxt = (hi + (i + 1) / 1279 * (lo - hi)) ** 7
        assert w_val == pytest.approx(1 / (grid[i].item() - nxt), rel=1e-5)
    # the lognormal(-1.2, 1.6) median of sigma is exp(-1.2)
    assert sigma.median().item() == pytest.approx(math.exp(-1.2), rel=0.08)


def test_diffusion_weight_spot_values():
    # reference notes: sigma = 80 -> 2.9, 1 -> 126, 0.3 -> 354, 0.1 -> 908 (w ~ sigma^(-6/7))
    grid = losses.karras_sigmas(1280)
    nxt = losses.karras_sigmas(1280, index=torch.arange(1, 1281))
    for value, expected in ((80, 2.9), (1.0, 126), (0.3, 354), (0.1, 908)):
        i = (grid - value).abs().argmin()
        assert (1 / (grid[i] - nxt[i])).item() == pytest.approx(expected, rel=0.02)


# ---------------------------------------------------------------- consistency fine-tuning
@pytest.mark.parametrize("stage,t,ratio", [
    # formulas §3.1 table (ECT stage a = EPG stage - 1), q = 2
    (1, 10.0, 0.5), (1, 80.0, 0.5), (2, 1.0, 0.212), (2, 2.0, 0.512), (2, 10.0, 0.75),
    (3, 0.01, 0.377), (3, 0.5, 0.497), (3, 1.0, 0.606), (4, 0.5, 0.749), (8, 0.01, 0.981), (8, 80.0, 0.996)])
def test_ect_ratio_spot_values(stage, t, ratio):
    r = losses.ct_r_from_t(torch.tensor([t], dtype=torch.float64), stage)
    assert (r / t).item() == pytest.approx(ratio, abs=1.5e-3)


def test_ect_limits_and_r_below_t():
    # r/t -> 1 - 2^-stage as t -> inf; r = sigma_min wherever ECT would give r <= 0 (stage 1: t < ln 7)
    for stage in range(1, 8):
        r = losses.ct_r_from_t(torch.tensor([1e4], dtype=torch.float64), stage)
        assert (r / 1e4).item() == pytest.approx(1 - 2.0 ** -stage, rel=1e-9)
    assert losses.ct_r_from_t(torch.tensor([1.9], dtype=torch.float64), 1).item() == losses.SIGMA_MIN
    assert losses.ct_r_from_t(torch.tensor([2.0], dtype=torch.float64), 1).item() > losses.SIGMA_MIN
    g = torch.Generator().manual_seed(0)
    for stage in (1, 3, 7):
        t, r = losses.ct_time_pair(10000, stage, generator=g)
        assert bool((r <= t).all()) and bool((r >= losses.SIGMA_MIN).all()) and bool((t >= losses.SIGMA_MIN).all())
        assert bool((r < t).any())
    assert [losses.ect_stage(k) for k in (0, 99_999, 100_000, 699_999)] == [1, 1, 2, 7]


def test_ct_weight():
    w = losses.ct_weight(torch.tensor([1.0, 0.008, 5.0]), torch.tensor([0.5, 0.008, 4.0]))
    assert torch.allclose(w, torch.tensor([2.0, 0.0, 1.0]))


def test_pseudo_huber_value_and_gradient():
    torch.manual_seed(0)
    pred = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    d = losses.pseudo_huber(pred, target, c=0.06)
    S = ((pred - target) ** 2).flatten(1).sum(1)
    assert torch.allclose(d.double(), S / torch.sqrt(S + 0.0036), rtol=1e-6)
    d.sum().backward()
    expected = 2 * (pred - target) / torch.sqrt(S + 0.0036).reshape(-1, 1, 1, 1)
    assert torch.allclose(pred.grad, expected.detach(), rtol=1e-5, atol=1e-7)


def test_exact_consistency_function_of_gaussian_data():
    """Formulas §8.1: for Gaussian data the exact consistency map
    f*(x, t) = mu + (x - mu) sqrt(s^2 + eb^2)/sqrt(s^2 + t^2) maps x_t and x_r of the same PF-ODE trajectory to the same
    point (distance 0), whereas a perturbed map does not."""
    mu, s, eb = 0.1, 0.5, 4 * losses.SIGMA_MIN
    f_star = lambda x, t: mu + (x - mu) * math.sqrt(s ** 2 + eb ** 2) / torch.sqrt(s ** 2 + t ** 2)
    g = torch.Generator().manual_seed(0)
    x_T = mu + math.sqrt(s ** 2 + 80.0 ** 2) * torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor(80.0, dtype=torch.float64)
    for r_value in (10.0, 1.0, 0.05):
        r = torch.tensor(r_value, dtype=torch.float64)
        x_r = mu + (x_T - mu) * torch.sqrt(s ** 2 + r ** 2) / torch.sqrt(s ** 2 + t ** 2)   # exact ODE solution
        assert losses.pseudo_huber(f_star(x_T, t), f_star(x_r, r)).max().item() < 1e-20
        assert losses.pseudo_huber(1.01 * f_star(x_T, t), f_star(x_r, r)).min().item() > 1e-6


# ---------------------------------------------------------------- the random variables of a step
def _generators(seed):
    """generator(device, stream) as trainlib.step_generators builds it (losses.py imports no project module)."""
    return lambda device, stream: torch.Generator(device=device).manual_seed(1000 * seed + stream)


@pytest.mark.parametrize("objective", ["rcm", "diffusion", "consistency"])
def test_draws_do_not_depend_on_the_number_of_processes(objective):
    # 4 ranks, each drawing its slice of a global batch of 8, together hold exactly what one process draws
    draws = {"rcm": lambda g, x, y, mine: losses.rcm_draws(g, x, mine, 8, 21),
             "diffusion": lambda g, x, y, mine: losses.diffusion_draws(g, x, y, mine, 8, 10, 0.4, 1.6, 0.5),
             "consistency": lambda g, x, y, mine: losses.consistency_draws(g, x, y, mine, 8, 10, 2, 1.2, 1.6, 0.5)}
    draw = draws[objective]
    x, y = torch.zeros(8, 3, 16, 16), torch.arange(8)
    whole = draw(_generators(3), x, y, slice(0, 8))
    parts = [draw(_generators(3), x[k:k + 2], y[k:k + 2], slice(k, k + 2)) for k in range(0, 8, 2)]
    for i, value in enumerate(whole):
        assert torch.equal(value, torch.cat([p[i] for p in parts]))
    assert whole[2].shape == (8, 3, 16, 16)
    # the fine-tuning levels come shifted by s = 16 / 64 (Table 9), eq. 8's unshifted (tau(t_n) takes them so)
    level = _generators(3)("cpu", losses.STREAM_LEVEL)
    unshifted = {"rcm": lambda: losses.rc_noise_pair(8, 21, level)[0],
                 "diffusion": lambda: losses.diffusion_noise(8, level, 0.4, 1.6)[0],
                 "consistency": lambda: losses.ct_time_pair(8, 2, level, 1.2, 1.6)[0]}[objective]()
    assert torch.allclose(whole[0], unshifted * (1 if objective == "rcm" else 16 / 64))


def test_label_dropout_has_its_own_stream():
    # changing the dropout rate changes no other variable; rate 0 keeps every label, rate 1 drops every one to 10
    x, y = torch.zeros(64, 3, 8, 8), torch.arange(64) % 10
    base = losses.diffusion_draws(_generators(0), x, y, slice(None), 64, 10, label_dropout=0.0)
    dropped = losses.diffusion_draws(_generators(0), x, y, slice(None), 64, 10, label_dropout=0.5)
    for a, b in zip(base[:3], dropped[:3]):
        assert torch.equal(a, b)
    assert torch.equal(base[3], y) and 10 < int((dropped[3] == 10).sum()) < 54
    everything = losses.consistency_draws(_generators(0), x, y, slice(None), 64, 10, 1, label_dropout=1.0)[3]
    assert bool((everything == 10).all())
    # the dropout mask is the label stream's own uniform draw, below the rate
    u = torch.rand(64, generator=_generators(0)("cpu", losses.STREAM_LABEL_DROP))
    assert torch.equal(dropped[3] == 10, u < 0.5)
