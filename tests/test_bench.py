"""bench.py on CPU: every stage runs, and the FLOP accounting matches the paper's sampler and hand-counted steps."""
import argparse

import torch

import bench
import models


def tiny_args(**kw):
    return argparse.Namespace(model="T", image_size=16, batch_size=2, iters=1, warmup=0, compile=False, **kw)


def test_every_stage_runs_on_cpu():
    device = torch.device("cpu")
    for stage in bench.STAGES:
        r = bench.bench(stage, tiny_args(), device, peak=1e12)
        assert r["images_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"] < 100


def test_flop_accounting():
    args = tiny_args()
    device = torch.device("cpu")
    epg = bench.forward_flops(models.build_epg("T", 16, 1000), 16)
    enc = bench.forward_flops(models.build_rcm("T", 16), 16)
    # Heun-32 with CFG on (0.19, 1.61]: 62 conditional + 12 unconditional evaluations per image (formulas §4.3)
    assert bench.sampling_stage(args, device)[1] == 74 * epg
    assert bench.diffusion_stage(args, device)[1] == 3 * epg          # forward + backward (2x forward)
    assert bench.pretrain_stage(args, device)[1] == 12 * enc
    assert bench.consistency_stage(args, device)[1] == 4 * epg + 3 * enc
