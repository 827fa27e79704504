"""The mathematics of EPG: noise schedules, preconditioning, the four training objectives and the samplers.

Each objective is one function of the networks and a batch that returns per-sample losses, as in EDM's
training/loss.py: `rcm_loss` (eq. 8), `diffusion_loss` (eq. 1), `consistency_loss` (eq. 4-5) and `aux_loss` (eq. 9).
Eq. 8 and eq. 9 compare against stop-gradient keys of the whole batch, computed first by `rcm_keys` / `aux_keys`, so
that with --micro-batch every micro-batch's queries still see every key. The random variables of a step are drawn
here too, one stream each (`rcm_draws`, `diffusion_draws`, `consistency_draws`).

Paper: Lei et al., arXiv 2510.12586, §2-3, eq. 1, 4-10, Tables 9-11. Conventions:

* EDM noise process x_t = x + t * eps, t = sigma in [sigma_min, sigma_max] = [0.002, 80], rho = 7, sigma_data = 0.5.
* Resolution shift (Table 9, "image_size/64", after Hoogeboom et al. 2023): the network sees sigma~ = s * sigma with
  s = image_size / 64. The shifted value is used for the noise that is added, for c_in, c(t), the consistency
  boundary sigma~_min, the sampler grid and the CFG interval. The *unshifted* sigma is used for every sampling
  distribution and grid index, the diffusion weight 1/(t_n - t_{n-1}) and the temperature schedule tau(t); the
  consistency weight 1/(t - r) uses shifted values.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


# ---- Grids, shift, preconditioning (eq. 4, eq. 10, Table 9) ----
def karras_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, index=None, dtype=torch.float64):
    """Eq. 10: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, the descending grid
    (N,), or its values at `index` (i = N: one step past sigma_min, for the last point's diffusion weight)."""
    i = torch.arange(n, dtype=dtype) if index is None else index.to(dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


def resolution_shift(image_size):
    """Table 9: noise levels are multiplied by image_size / 64 (4 at 256^2, 8 at 512^2)."""
    return image_size / 64.0


def c_in(sigma):
    """Input preconditioning 1/sqrt(sigma^2 + sigma_data^2) (Table 9), of the shifted sigma."""
    return 1.0 / torch.sqrt(sigma ** 2 + SIGMA_DATA ** 2)


def c_noise(sigma):
    """Time condition c(t) = 1000 * 1/4 * ln(t) (Table 9), of the shifted sigma."""
    return 250.0 * torch.log(sigma)


def consistency_scalings(sigma, sigma_min):
    """Eq. 4 with EDM's boundary-condition scalings (sigma, sigma_min shifted), c_skip(sigma_min) = 1, c_out = 0:
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)."""
    c_skip = SIGMA_DATA ** 2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA ** 2)
    c_out = (sigma - sigma_min) * SIGMA_DATA / torch.sqrt(sigma ** 2 + SIGMA_DATA ** 2)
    return c_skip, c_out


def _bcast(v, x):
    """Reshape a per-sample (B,) tensor to broadcast against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def precondition(x, sigma):
    """Network inputs of noisy images x (B, 3, H, W) at shifted levels sigma (B,): (c_in(sigma) x, c(sigma))."""
    return x * _bcast(c_in(sigma), x), c_noise(sigma)


def denoise(model, x_t, sigma, y):
    """Diffusion denoiser D(x_t; sigma~) = F(c_in x_t, c(sigma~), y): x-prediction (Table 9); sigma (B,) shifted."""
    return model(*precondition(x_t, sigma), y)


def consistency_function(model, x_t, sigma, y, sigma_min):
    """Eq. 4: f(x_t, sigma~) = c_skip x_t + c_out F(c_in x_t, c(sigma~), y)."""
    c_skip, c_out = consistency_scalings(sigma, sigma_min)
    return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * denoise(model, x_t, sigma, y)


# ---- The random variables of a step ----
# generator(device, stream) -> a torch.Generator of the step that every rank builds alike (trainlib.step_generators):
# each variable is drawn for the GLOBAL batch and a rank keeps its slice `mine`, so a run does not depend on the
# number of processes; each variable has its own stream, so changing one draw leaves the others' numbers alone.
STREAM_LEVEL, STREAM_EPS, STREAM_LABEL_DROP = 0, 1, 2     # noise levels (and their weights), eps, label dropout


def step_eps(generator, x, mine, batch_size):
    """eps ~ N(0, I) of the global batch (batch_size, *x.shape[1:]), drawn on x's device -> this rank's slice."""
    shape = (batch_size, *x.shape[1:])
    return torch.randn(shape, device=x.device, generator=generator(x.device, STREAM_EPS))[mine]


def drop_labels(generator, y, mine, batch_size, p, null_label):
    """Classifier-free guidance's label dropout: y (this rank's labels) -> null_label w.p. p, per image."""
    drop = torch.rand(batch_size, generator=generator("cpu", STREAM_LABEL_DROP))[mine].to(y.device, non_blocking=True)
    return torch.where(drop < p, torch.full_like(y, null_label), y)


# ---- NT-Xent (eq. 7) and pre-training (eq. 6-8) ----
def global_keys(k):
    """Stop-gradient keys (B, D) of this rank -> L2-normalised fp32 keys of the GLOBAL batch (world*B, D)."""
    k = F.normalize(k.detach().float(), dim=-1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return k
    parts = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts)


def nt_xent(q, k, tau, first=None):
    """Eq. 7 per query (L2-normalised): -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_k- exp(q.k- / tau)) ) -> (B,).
    k: the positive keys (B, D), gathered here; or, with `first`, the global_keys of the whole step, q[i]'s positive
    being k[first + i] (a micro-batch's queries still see every key). Negatives: every other key of the global batch;
    no 2*tau factor, no memory queue. tau: float or (B,)."""
    if first is None:
        k, first = global_keys(k), (dist.get_rank() if dist.is_initialized() else 0) * q.shape[0]
    positive = first + torch.arange(q.shape[0], device=q.device)
    tau = tau.float().reshape(-1, 1) if torch.is_tensor(tau) else tau           # a float stays on the host
    logits = F.normalize(q.float(), dim=-1) @ k.T / tau                             # (B, world*B)
    return F.cross_entropy(logits, positive, reduction="none")


def rc_tau(sigma, step, total_steps, tau1=0.1, tau2=0.2, schedule="annealed"):
    """Temperature of the representation-consistency loss, tau(t) = tau1 (1 - t) + tau2 t (§3.2, Table 10), with
    t = (sigma - sigma_min) / (sigma_max - sigma_min) of the *unshifted* level of the noisier input. schedule:
      "annealed" (paper): tau2(k) = tau2 - (tau2 - tau1) sin(0.75 pi k / K) for k <= 2K/3, then tau1;
      "interpolated":     tau2 kept constant;
      "constant":         tau = tau1 everywhere (the official code's released configuration)."""
    if schedule == "constant":
        return torch.full_like(sigma, tau1, dtype=torch.float32)
    if schedule == "annealed":
        frac = min(step / max(total_steps, 1), 2.0 / 3.0)
        tau2 = tau2 - (tau2 - tau1) * math.sin(0.75 * math.pi * frac)
    elif schedule != "interpolated":
        raise ValueError(f"unknown tau schedule '{schedule}'")
    t = (sigma.float() - SIGMA_MIN) / (SIGMA_MAX - SIGMA_MIN)
    return tau1 * (1 - t) + tau2 * t


def ict_num_scales(step, total_steps, s0=20, s1=1280, variant="ict"):
    """Grid points N(k) of iCT's curriculum (Song & Dhariwal 2023), 20 -> 1280 in the paper (Table 9):
    "ict" (paper):  K' = floor(K / (log2 floor(s1/s0) + 1)),  N(k) = min(s0 * 2^floor(k/K'), s1) + 1
    "official":     K' = ceil(K / log2(ceil(s1/s0) + 1)),     N(k) = min(s0 * 2^ceil(k/K'), s1) + 1"""
    if variant == "ict":
        k_prime = max(total_steps // (int(math.log2(s1 // s0)) + 1), 1)
        doublings = step // k_prime
    elif variant == "official":
        k_prime = max(math.ceil(total_steps / math.log2(math.ceil(s1 / s0) + 1)), 1)
        doublings = math.ceil(step / k_prime)
    else:
        raise ValueError(f"unknown curriculum variant '{variant}'")
    return min(s0 * 2 ** doublings, s1) + 1


def rc_noise_pair(batch_size, num_scales, generator=None, shared=False, device="cpu"):
    """Adjacent unshifted levels of eq. 6, 8: (t_n = grid[n], the cleaner t_{n-1} = grid[n+1]), n ~ U{0, .., N-2} per
    sample (paper: n ~ U(0, N)), or with `shared` one n for the whole batch (official code)."""
    count = 1 if shared else batch_size
    n = torch.randint(0, num_scales - 1, (count,), generator=generator).expand(batch_size)
    return tuple(karras_sigmas(num_scales, index=i).float().to(device, non_blocking=True) for i in (n, n + 1))


def rcm_draws(generator, x, mine, batch_size, num_scales, shared=False):
    """The random variables of eq. 8 for this rank's images x (B, 3, H, W), the slice `mine` of a global batch of
    batch_size -> device tensors (t_n, t_{n-1} (B,) UNSHIFTED, as tau(t_n) takes them; eps): the adjacent levels of
    rc_noise_pair on the N = num_scales grid and eps, each from its own stream."""
    t_n, t_next = rc_noise_pair(batch_size, num_scales, generator("cpu", STREAM_LEVEL), shared, x.device)
    return t_n[mine], t_next[mine], step_eps(generator, x, mine, batch_size)


@torch.no_grad()
def rcm_keys(momentum, target, x, view1, view2, eps, sigma_next, sigma_views):
    """The stop-gradient keys of eq. 8 for a whole step's batch, as global_keys: k1, k2 = L-(E-(y~)) of the momentum
    branch (momentum(x_in, c) -> (k1, k2), x_in = [y1~; y2~]) on the views at y~ = y + sigma_views eps, and h_next =
    sg E(x + t_{n-1} eps) of target(x_in, c) -> LN'd CLS, the online encoder itself; sigma_next (B,) shifted."""
    s0 = torch.full_like(sigma_next, sigma_views)
    k1, k2 = momentum(*precondition(torch.cat([view1 + sigma_views * eps, view2 + sigma_views * eps]),
                                    torch.cat([s0, s0])))
    h_next = target(*precondition(x + _bcast(sigma_next, x) * eps, sigma_next))
    return global_keys(k1), global_keys(k2), global_keys(h_next)


def rcm_loss(online, keys, x, view1, view2, eps, sigma_n, sigma_views, tau_rc, ctr_tau, first):
    """Eq. 8 per image (lambda(t) = 1), one Gaussian eps shared by all inputs of an image (eq. 6) -> (contrastive,
    consistency), each (B,):
        contrastive:  NT-Xent(L(E(y1~)), sg L-(E-(y2~)); ctr_tau) + NT-Xent(L(E(y2~)), sg L-(E-(y1~)); ctr_tau)
        consistency:  NT-Xent(E(x + t_n eps), sg E(x + t_{n-1} eps); tau(t_n))
    online(x_in, c) -> (q1, q2, h_n) for x_in = [y1~; y2~; x_n], in one encoder pass; keys: rcm_keys of the step,
    `first` the global index of x[0] among them; sigma_n: (B,) shifted t_n."""
    s0 = torch.full_like(sigma_n, sigma_views)
    inputs = torch.cat([view1 + sigma_views * eps, view2 + sigma_views * eps, x + _bcast(sigma_n, x) * eps])
    q1, q2, h_n = online(*precondition(inputs, torch.cat([s0, s0, sigma_n])))
    k1, k2, h_next = keys
    contrastive = nt_xent(q1, k2, ctr_tau, first) + nt_xent(q2, k1, ctr_tau, first)
    return contrastive, nt_xent(h_n, h_next, tau_rc, first)


# ---- Diffusion fine-tuning (eq. 1, Table 9) ----
DIFFUSION_SCALES = 1280


def diffusion_noise(batch_size, generator=None, p_mean=-1.2, p_std=1.6, num_scales=DIFFUSION_SCALES):
    """t ~ lognormal(-1.2, 1.6) snapped to the N = 1280 grid (Table 9 dagger), unshifted -> (sigma, weight), (B,)
    float32, weight = 1 / (t_n - t_{n-1}) to the next cleaner point (past the last one: the extrapolated grid)."""
    grid = karras_sigmas(num_scales)
    t = torch.exp(p_mean + p_std * torch.randn(batch_size, generator=generator, dtype=torch.float64))
    index = (t[:, None] - grid[None]).abs().argmin(dim=1)
    sigma = grid[index]
    weight = 1.0 / (sigma - karras_sigmas(num_scales, index=index + 1))
    return sigma.float(), weight.float()


def diffusion_draws(generator, x, y, mine, batch_size, null_label, p_mean=-1.2, p_std=1.6, label_dropout=0.1):
    """The random variables of eq. 1 for this rank's images x (B, 3, H, W) and labels y, the slice `mine` of a global
    batch of batch_size -> device tensors (sigma~ = s t_n (B,), weight (B,), eps, y with label dropout to the null
    class): t_n and its weight of diffusion_noise, eps, label dropout w.p. label_dropout, each from its own stream."""
    sigma, weight = diffusion_noise(batch_size, generator("cpu", STREAM_LEVEL), p_mean, p_std)
    sigma, weight = (v.to(x.device, non_blocking=True)
                     for v in (resolution_shift(x.shape[-1]) * sigma[mine], weight[mine]))      # Table 9: shifted
    return (sigma, weight, step_eps(generator, x, mine, batch_size),
            drop_labels(generator, y, mine, batch_size, label_dropout, null_label))


def diffusion_loss(net, x0, y, sigma, weight, eps):
    """Eq. 1 per image with Table 9's settings: weight * mean_pixels (D(x0 + sigma eps; sigma, y) - x0)^2 -> (B,),
    sigma the SHIFTED s t_n, weight 1/(t_n - t_{n-1}) of the unshifted grid (diffusion_noise)."""
    pred = denoise(net, x0 + _bcast(sigma, x0) * eps, sigma, y)
    return weight.float() * (pred.float() - x0.float()).pow(2).flatten(1).mean(dim=1)


# ---- Consistency fine-tuning (eq. 4, 5, 9, Table 9; ECT's time pairs) ----
def ect_stage(step, interval=100_000):
    """ECT stage of the official code: 1 + floor(step / 100k) (the interval is a flag for short runs)."""
    return 1 + step // interval


def ct_r_from_t(t, stage, q=2.0, k=8.0, b=1.0):
    """ECT's mapping p(r|t) with the official code's clamp at sigma_min:
    r = max(sigma_min, t (1 - q^-stage (1 + k sigmoid(-b t)))). r/t -> 1 - q^-stage as t -> inf."""
    r = t * (1 - q ** (-stage) * (1 + k * torch.sigmoid(-b * t)))
    return torch.maximum(r, torch.full_like(r, SIGMA_MIN))


def ct_time_pair(batch_size, stage, generator=None, p_mean=-0.4, p_std=1.6):
    """ECT's time pair (t, r), unshifted: t ~ lognormal(-0.4, 1.6) clamped below at sigma_min (no upper clamp, as in
    the official code), r = ct_r_from_t(t, stage). Returns (t, r), each (B,) float32, r <= t."""
    t = torch.exp(p_mean + p_std * torch.randn(batch_size, generator=generator, dtype=torch.float64))
    t = t.clamp(min=SIGMA_MIN)
    return t.float(), ct_r_from_t(t, stage).float()


def consistency_draws(generator, x, y, mine, batch_size, null_label, stage, p_mean=-0.4, p_std=1.6,
                      label_dropout=0.0):
    """The random variables of eq. 5 for this rank's images x (B, 3, H, W) and labels y, the slice `mine` of a global
    batch of batch_size -> device tensors (t~, r~ (B,) shifted, eps, y with label dropout to the null class): ECT's
    time pair ct_time_pair at `stage`, eps, label dropout w.p. label_dropout, each from its own stream."""
    t, r = ct_time_pair(batch_size, stage, generator("cpu", STREAM_LEVEL), p_mean, p_std)
    shift = resolution_shift(x.shape[-1])
    t, r = (v.to(x.device, non_blocking=True) for v in (shift * t[mine], shift * r[mine]))  # Table 9: shifted
    return (t, r, step_eps(generator, x, mine, batch_size),
            drop_labels(generator, y, mine, batch_size, label_dropout, null_label))


def ct_weight(t_shifted, r_shifted):
    """Consistency weight lambda = 1 / (t~ - r~) on shifted values (Table 9), 0 where t = r."""
    gap = t_shifted - r_shifted
    return torch.where(gap > 0, 1.0 / gap.clamp(min=1e-20), torch.zeros_like(gap))


def pseudo_huber(pred, target, c=0.06):
    """Consistency distance of the official code, S / sg(sqrt(S + c^2)) with S the per-sample sum of squares: its
    gradient grad(S) / sqrt(S + c^2) is that of ECT's pseudo-Huber sqrt(S + c^2) - c up to a factor 2."""
    s = (pred.float() - target.float()).pow(2).flatten(1).sum(dim=1)
    return s / torch.sqrt(s + c * c).detach()


def consistency_loss(net, target, x0, y, t, r, eps, sigma_min, huber_c=0.06, rng_devices=()):
    """Eq. 5 per image: ct_weight(t~, r~) pseudo_huber(f_theta(x0 + t~ eps, t~), f_sg(theta)(x0 + r~ eps, r~)), f of
    eq. 4 -> (loss (B,), f_theta(x_t, t~) with gradient, for aux_loss). target: the same network, current weights (no
    EMA teacher); it runs first, under no_grad in a forked RNG (rng_devices: the CUDA devices) that is rewound, so the
    online pass draws the same dropout masks (the official code saves and restores the CUDA RNG state)."""
    with torch.random.fork_rng(devices=list(rng_devices)), torch.no_grad():
        target_x = consistency_function(target, x0 + _bcast(r, x0) * eps, r, y, sigma_min)
    prediction = consistency_function(net, x0 + _bcast(t, x0) * eps, t, y, sigma_min)
    return ct_weight(t, r) * pseudo_huber(prediction, target_x, huber_c), prediction


@torch.no_grad()
def aux_keys(W, x0, sigma_min):
    """The stop-gradient keys sg W(x_t0, t_0) of eq. 9 of a whole step's batch, as global_keys; W(x_in, c) -> (B, D),
    the frozen RCM's LN'd CLS (paper) or projector output (official); t_0 = sigma~_min, where x_t0 is data (eq. 4)."""
    return global_keys(W(*precondition(x0, torch.full((x0.shape[0],), sigma_min, device=x0.device))))


def aux_loss(W, prediction, keys, t, sigma_min, tau, kind, first):
    """Eq. 9 per image: NT-Xent(W(f_theta(x_t, t~), t~), sg W(x_t0, t_0)), the gradient flowing through the frozen W
    into the prediction; keys: aux_keys of the step, `first` the global index of prediction[0]. kind "encoder": the
    paper (the prediction at t~); "projector": the official code (the prediction at sigma~_min too)."""
    sigma = t if kind == "encoder" else torch.full_like(t, sigma_min)
    return nt_xent(W(*precondition(prediction, sigma)), keys, tau, first)


# ---- Samplers (paper §4: Heun-32 with interval CFG, Euler-50, one/two-step consistency sampling) ----
def sampling_sigmas(steps, image_size):
    """Shifted Karras grid sigma~_i = s * t_i (eq. 10, Table 9), descending, float64 (steps,), no final zero: the
    samplers stop at s * sigma_min and return x there, as the official code does."""
    return resolution_shift(image_size) * karras_sigmas(steps)


def clamp_to(x, bounds):
    """x (B, 3, H, W) clamped per channel to bounds = (lo (3,), hi (3,)), or None."""
    if bounds is None:
        return x
    lo, hi = (b.to(x.device, x.dtype).view(1, 3, 1, 1) for b in bounds)
    return torch.maximum(torch.minimum(x, hi), lo)


def guided_denoiser(model, labels, null_label, shift, cfg_scale=1.0, cfg_interval=(0.19, 1.61), clamp=None,
                    counter=None, autocast=contextlib.nullcontext):
    """denoiser(x, sigma~ (float)): D of an x-prediction network with interval CFG (Kynkaanniemi et al. 2024, as the
    official code), cfg_interval unshifted, tested on the grid's own float64 sigma (never one recovered from c_noise):
        inside lo < sigma/s <= hi and w != 1:  D_u + w (D_c - D_u), cond and uncond batched in one forward;
        otherwise:                             D_c (only the conditional forward runs).
    null_label = num_classes; clamp: per-channel bounds or None; counter: a dict counting images through the net."""
    lo, hi = cfg_interval

    def denoiser(x, sigma):
        guide = cfg_scale != 1.0 and lo < sigma / shift <= hi
        x_in, y_in = (torch.cat([x, x]), torch.cat([labels, torch.full_like(labels, null_label)])) if guide \
            else (x, labels)
        with autocast():
            out = denoise(model, x_in.float(), torch.full((x_in.shape[0],), sigma, device=x.device), y_in)
        if counter is not None:
            counter["forwards"] = counter.get("forwards", 0) + x_in.shape[0]
        if guide:
            cond, uncond = out.to(x.dtype).chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        return clamp_to(out.to(x.dtype), clamp)

    return denoiser


def consistency_fn(model, labels, shift, clamp=None, counter=None, autocast=contextlib.nullcontext):
    """f(x, sigma~ (float)) of eq. 4 with boundary s * sigma_min, clamped like D."""
    def f(x, sigma):
        with autocast():
            out = consistency_function(model, x.float(), torch.full((x.shape[0],), sigma, device=x.device), labels,
                                       shift * SIGMA_MIN)
        if counter is not None:
            counter["forwards"] = counter.get("forwards", 0) + x.shape[0]
        return clamp_to(out.to(x.dtype), clamp)

    return f


@torch.no_grad()
def heun_sample(denoiser, x, sigmas):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 2, S_churn = 0) from x = sigmas[0] z over the shifted
    grid, WITHOUT a final step to sigma = 0 (returns x at sigmas[-1]); 2 (steps - 1) denoiser calls:
        d = (x - D(x; s_i)) / s_i;  x' = x + (s_{i+1} - s_i) d;  d' = (x' - D(x'; s_{i+1})) / s_{i+1}
        x <- x + (s_{i+1} - s_i) (d + d') / 2
    """
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoiser(x, s_cur)) / s_cur
        x_euler = x + (s_next - s_cur) * d
        x = x + (s_next - s_cur) * 0.5 * (d + (x_euler - denoiser(x_euler, s_next)) / s_next)
    return x


@torch.no_grad()
def euler_sample(denoiser, x, sigmas):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, as heun_sample (steps - 1
    denoiser calls: 49 for the paper's 50-step ablation sampler)."""
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s_cur) * (x - denoiser(x, s_cur)) / s_cur
    return x


@torch.no_grad()
def consistency_sample(f, z, shift, mid_sigmas=()):
    """Consistency sampling (Song et al. 2023, Alg. 1) at shifted levels: x = f(s*80 z_0, s*80), then per unshifted
    t_mid: x <- f(x + sqrt((s t_mid)^2 - (s sigma_min)^2) z_k, s t_mid). z: (1 + len(mid_sigmas), B, 3, H, W)."""
    sigma_max, sigma_min = shift * SIGMA_MAX, shift * SIGMA_MIN
    x = f(sigma_max * z[0], sigma_max)
    for k, t_mid in enumerate(mid_sigmas, start=1):
        t = shift * t_mid
        x = f(x + math.sqrt(t * t - sigma_min * sigma_min) * z[k], t)
    return x
