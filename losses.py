"""Noise schedules, preconditioning and losses of EPG as small pure functions.

Paper: Lei et al., arXiv 2510.12586, §2-3, eq. 1, 4-10, Tables 9-11. Conventions:

* EDM noise process x_t = x + t * eps, t = sigma in [sigma_min, sigma_max] = [0.002, 80], rho = 7, sigma_data = 0.5.
* Karras grid (eq. 10) is *descending*: index 0 is sigma_max, index N-1 is sigma_min.
* Resolution shift (Table 9, "image_size/64", after Hoogeboom et al. 2023): the network sees sigma~ = s * sigma with
  s = image_size / 64. The shifted value is used for the noise that is added, for c_in, c(t), the consistency
  boundary sigma~_min, the sampler grid and the CFG interval. The *unshifted* sigma is used for every sampling
  distribution and grid index, the diffusion weight 1/(t_n - t_{n-1}) and the temperature schedule tau(t); the
  consistency weight 1/(t - r) uses shifted values.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

SIGMA_MIN, SIGMA_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


# ----------------------------------------------------------------------------------------------------------------
# Grids, shift, preconditioning (eq. 4, eq. 10, Table 9)
# ----------------------------------------------------------------------------------------------------------------
def karras_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, index=None, dtype=torch.float64):
    """Eq. 10: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1.

    Returns the whole descending grid (N,), or the values at `index` (any int tensor; i = N extrapolates one step
    past sigma_min, which the diffusion weight of the last grid point needs).
    """
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
    """Eq. 4 with EDM's boundary-condition scalings; sigma and sigma_min both shifted.

    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2),
    so that c_skip(sigma_min) = 1, c_out(sigma_min) = 0 and f(x, sigma_min) = x exactly.
    """
    c_skip = SIGMA_DATA ** 2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA ** 2)
    c_out = (sigma - sigma_min) * SIGMA_DATA / torch.sqrt(sigma ** 2 + SIGMA_DATA ** 2)
    return c_skip, c_out


def _bcast(v, x):
    """Reshape a per-sample (B,) tensor to broadcast against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def denoise(model, x_t, sigma, y):
    """Diffusion denoiser D(x_t; sigma~) = F(c_in x_t, c(sigma~), y): x-prediction (Table 9).

    x_t: (B, 3, H, W), sigma: (B,) shifted, y: (B,) -> (B, 3, H, W).
    """
    return model(x_t * _bcast(c_in(sigma), x_t), c_noise(sigma), y)


def consistency_function(model, x_t, sigma, y, sigma_min):
    """Eq. 4: f(x_t, sigma~) = c_skip x_t + c_out F(c_in x_t, c(sigma~), y). Shapes as `denoise`."""
    c_skip, c_out = consistency_scalings(sigma, sigma_min)
    return _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * denoise(model, x_t, sigma, y)


# ----------------------------------------------------------------------------------------------------------------
# NT-Xent (eq. 7) and the pre-training losses (eq. 8)
# ----------------------------------------------------------------------------------------------------------------
def gather_keys(k):
    """All-gather stop-gradient keys (B, D) from every rank -> (world*B, D), rank order; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts)


def nt_xent(q, k, tau):
    """Eq. 7: -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_k- exp(q.k- / tau)) ), per query.

    q: (B, D) local queries (with gradient); k: (B, D) their positive keys (treated as stop-gradient). Both are
    L2-normalised here. Negatives are the keys of every other image of the *global* batch (gathered from all ranks),
    no 2*tau factor, no memory queue. tau: float or (B,) per-query temperature. Returns (B,) fp32 losses.
    """
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.detach().float(), dim=-1)
    keys = gather_keys(k)
    rank = dist.get_rank() if (dist.is_available() and dist.is_initialized()) else 0
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    tau = torch.as_tensor(tau, dtype=torch.float32, device=q.device).reshape(-1, 1)
    logits = q @ keys.T / tau                                          # (B, world*B)
    return F.cross_entropy(logits, labels, reduction="none")


def contrastive_loss(q1, q2, k1, k2, tau=0.2):
    """Contrastive term of eq. 8, symmetrised as in MoCo v3: NT-Xent(q1, k2) + NT-Xent(q2, k1).

    q1, q2: online projector outputs of the two views (B, P); k1, k2: momentum-encoder projector outputs. -> (B,)
    """
    return nt_xent(q1, k2, tau) + nt_xent(q2, k1, tau)


def rc_tau(sigma, step, total_steps, tau1=0.1, tau2=0.2, schedule="annealed"):
    """Temperature of the representation-consistency loss, tau(t) = tau1 (1 - t) + tau2 t (§3.2, Table 10).

    t = (sigma - sigma_min) / (sigma_max - sigma_min) in [0, 1] is the linearly normalised *unshifted* noise level of
    the noisier input. schedule:
      "annealed" (paper): tau2 decays to tau1 along a quarter-sine over the first two thirds of training,
                          tau2(k) = tau2 - (tau2 - tau1) sin(0.75 pi k / K) for k <= 2K/3, then tau1;
      "interpolated":     tau2 kept constant;
      "constant":         tau = tau1 everywhere (the official code's released configuration).
    sigma: (B,) tensor -> (B,) temperatures.
    """
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
    """Discretisation curriculum N(k) of iCT (Song & Dhariwal 2023), 20 -> 1280 in the paper (Table 9).

    "ict" (paper):  K' = floor(K / (log2 floor(s1/s0) + 1)),  N(k) = min(s0 * 2^floor(k/K'), s1) + 1
    "official":     K' = ceil(K / log2(ceil(s1/s0) + 1)),     N(k) = min(s0 * 2^ceil(k/K'), s1) + 1
    Returns the number of grid points N (the grid has N - 1 intervals).
    """
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
    """Adjacent noise levels of the representation-consistency loss (eq. 6, 8), unshifted.

    n ~ U{0, .., N-2} per sample (paper: n ~ U(0, N)); `shared=True` draws one n for the whole batch (official
    code; for the whole *global* batch the caller must use the same generator state on every rank).
    Returns (sigma_n, sigma_next): the noisier t_n = grid[n] and the cleaner t_{n-1} = grid[n+1], each (B,) float32.
    """
    count = 1 if shared else batch_size
    n = torch.randint(0, num_scales - 1, (count,), generator=generator).expand(batch_size)
    sigma_n = karras_sigmas(num_scales, index=n)
    sigma_next = karras_sigmas(num_scales, index=n + 1)
    return sigma_n.float().to(device), sigma_next.float().to(device)


# ----------------------------------------------------------------------------------------------------------------
# Diffusion fine-tuning (eq. 1, Table 9)
# ----------------------------------------------------------------------------------------------------------------
DIFFUSION_SCALES = 1280


def diffusion_noise(batch_size, generator=None, p_mean=-1.2, p_std=1.6, num_scales=DIFFUSION_SCALES):
    """t ~ lognormal(-1.2, 1.6) snapped to the nearest point of the N = 1280 grid (Table 9 dagger); unshifted.

    Returns (sigma (B,) float32, weight (B,) float32) with weight = 1 / (t_n - t_{n-1}), the gap from t_n to the next
    cleaner grid point (the last point uses the grid extrapolated one step past sigma_min).
    """
    grid = karras_sigmas(num_scales)
    t = torch.exp(p_mean + p_std * torch.randn(batch_size, generator=generator, dtype=torch.float64))
    index = (t[:, None] - grid[None]).abs().argmin(dim=1)
    sigma = grid[index]
    weight = 1.0 / (sigma - karras_sigmas(num_scales, index=index + 1))
    return sigma.float(), weight.float()


def diffusion_loss(pred, x0, weight):
    """Weighted x-prediction loss of eq. 1: weight * mean over pixels of (D - x0)^2. -> (B,) per-sample losses."""
    return weight.float() * (pred.float() - x0.float()).pow(2).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Consistency fine-tuning (eq. 4, 5, 9, Table 9; ECT's time pairs)
# ----------------------------------------------------------------------------------------------------------------
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


def ct_weight(t_shifted, r_shifted):
    """Consistency weight lambda = 1 / (t~ - r~) on shifted values (Table 9), 0 where t = r."""
    gap = t_shifted - r_shifted
    return torch.where(gap > 0, 1.0 / gap.clamp(min=1e-20), torch.zeros_like(gap))


def pseudo_huber(pred, target, c=0.06):
    """Consistency distance of the official code: S / sg(sqrt(S + c^2)), S = per-sample sum of squared differences.

    Its gradient is grad(S) / sqrt(S + c^2): ECT's pseudo-Huber sqrt(S + c^2) - c up to a factor 2. -> (B,)
    """
    s = (pred.float() - target.float()).pow(2).flatten(1).sum(dim=1)
    return s / torch.sqrt(s + c * c).detach()
