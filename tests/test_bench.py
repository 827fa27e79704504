"""tools/bench.py on CPU (tests/test_gpu_check.py runs every stage end to end): the FLOP accounting matches the
paper's sampler and hand-counted steps; the memory estimate matches hand-counted parameters and direct measurement."""
import argparse
import os
import sys

import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench  # noqa: E402
import models  # noqa: E402


def tiny_args(**kw):
    return argparse.Namespace(model="T", image_size=16, batch_size=2, iters=1, warmup=0, compile=False, **kw)


def test_flop_accounting():
    args = tiny_args()
    device = torch.device("cpu")
    epg = models.forward_flops("epg", "T", 16)
    enc = models.forward_flops("rcm", "T", 16)
    macs = models.count_macs(models.build_epg("T", 16, 1000), 16)          # a real model, not one on meta
    assert epg == 2 * (macs["linear"] + macs["attention"]) and enc < epg
    # Heun-32 with CFG on (0.19, 1.61]: 62 conditional + 12 unconditional evaluations per image (formulas §4.3)
    assert bench.sampling_stage(args, device)[1] == 74 * epg
    assert bench.diffusion_stage(args, device)[1] == 3 * epg          # forward + backward (2x forward)
    assert bench.pretrain_stage(args, device)[1] == 12 * enc
    assert bench.consistency_stage(args, device)[1] == 4 * epg + 3 * enc


def test_memory_of_parameters_and_optimiser():
    # RCM-T at 16^2 by hand: width 128, depth 4, MLP 512, 2x2 patches -> 64 tokens + [CLS] + [time]; projector
    # 128 -> 512 -> 512 -> 128 without biases, BatchNorm (weight, bias) after the first two layers
    D, tokens, hidden, out = 128, 64, 512, 128
    block = 2 * D + 3 * D * D + (D * D + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
    encoder = (3 * 2 * 2 * D + D) + D + (2 + tokens) * D + 4 * block + 2 * D
    n = encoder + D * hidden + 2 * hidden + hidden * hidden + 2 * hidden + hidden * out
    assert n == models.count_params(models.build_rcm("T", 16))
    m = bench.estimate_memory("pretrain", "T", 16, per_gpu_batch=4)
    assert m["params"] + m["grads"] + m["adamw"] == 16 * n and m["copies"] == 4 * n       # + the momentum RCM
    assert m["total"] == sum(m.values()) - m["total"] and m["activations"] > 0


def test_activation_bytes_linear_in_batch_and_depth():
    one, two, three = (bench.saved_bytes("diffusion", "T", 16, b, 4) for b in (1, 2, 3))
    assert 0 < two - one == three - two
    # extrapolated from 1-2 images and 1-2 blocks = measured at 6 images and full depth (exactly, but for the
    # NT-Xent logits of the contrastive stages, batch x batch)
    assert bench.activation_bytes("diffusion", "T", 16, 6) == bench.saved_bytes("diffusion", "T", 16, 6, 4)
    for stage in ("pretrain", "consistency"):
        assert abs(bench.activation_bytes(stage, "T", 16, 6) / bench.saved_bytes(stage, "T", 16, 6, 4) - 1) < 1e-4


def test_memory_table_names_the_largest_fitting_micro_batch(monkeypatch, capsys):
    monkeypatch.setattr(bench, "PAPER_RUNS", (("diffusion", "T", 16),))
    two = bench.estimate_memory("diffusion", "T", 16, 2)["total"]
    assert two < bench.estimate_memory("diffusion", "T", 16, 4)["total"]                 # more images, more memory
    monkeypatch.setattr(bench, "GPU_BYTES", {"big": 1e12, "exact": two, "small": 1.0})
    bench.memory_report(4)
    row = capsys.readouterr().out.splitlines()[-1]
    parts = bench.estimate_memory("diffusion", "T", 16, 4)
    assert row.startswith(f"| diffusion | EPG-T/{models.patch_size_for('T', 16)} @16 | ")
    assert f"| {parts['total'] / 2 ** 30:.1f} |" in row
    assert row.endswith("| yes | --micro-batch 2 | no |")       # 4 images fit in 1 TB, 2 exactly, none in 1 byte
