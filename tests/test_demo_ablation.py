"""demo.py --ablation's held-out score (eq. 1 with Table 9's weighting on the validation split), against a closed form:
a freshly initialised EPG outputs exactly zero (adaLN-Zero, zero output layer), so with a noise proposal of zero
spread (t = exp(p_mean), snapped to the Karras grid) the loss is w * mean(x0^2) with w = 1 / (t_n - t_{n+1})."""
import numpy as np
import torch

import demo
import shapes
import models


def test_heldout_loss_of_a_zero_model_is_the_weighted_data_energy(tmp_path):
    torch.manual_seed(0)
    model = models.build_epg("T", 32, 10)
    config = dict(model="T", image_size=32, num_classes=10, normalize="simple", p_mean=0.0, p_std=0.0,
                  num_scales=1280)
    path = tmp_path / "ckpt.pt"
    torch.save({"stage": "diffusion", "config": config, "step": 1, "model": model.state_dict(),
                "ema": model.state_dict(), "optimizer": {}}, path)
    result = demo.heldout_denoising_loss(str(path), images=20, batch=8)

    # the Karras grid of eq. 10 written out with numpy: sigma_min 0.002, sigma_max 80, rho 7, N = 1280
    i = np.arange(1281, dtype=np.float64)
    grid = (80 ** (1 / 7) + i / 1279 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    n = int(np.abs(grid[:1280] - 1.0).argmin())
    weight = 1.0 / (grid[n] - grid[n + 1])
    val = shapes.EmbeddedShapes("val", 32)
    x0 = np.stack([val[k][0].numpy() for k in range(20)]).astype(np.float64) / 127.5 - 1.0
    energy = (x0 ** 2).mean()
    assert abs(result["loss"] - weight * energy) <= 1e-5 * weight * energy
    assert list(result["per_sigma"]) == ["t in [0.1, 1)" if grid[n] < 1 else "t in [1, 10)"]
    assert abs(next(iter(result["per_sigma"].values())) - energy) <= 1e-5 * energy
