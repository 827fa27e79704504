"""The paper's ablations are flags (README, "Paper ablations"); each test fails when its flag does nothing.

  * Table 13 "Frozen": the encoder's weights stay bitwise those of the RCM while the decoder moves;
  * Table 13 "Lrd=0.5": the fresh decoder outputs zero, so the encoder's first gradient comes in step 2, where Adam
    moves a weight by lr * sqrt(1 + beta2) / (1 + beta1) (bias-corrected moments of one gradient after a zero one):
    the largest change of each encoder tensor is that times its documented multiplier (patch embedding
    0.5^(depth+1), block i 0.5^(depth-i), the final norm 1);
  * Tables 12b/12c and 12a: a term weighted 0 contributes no gradient, so changing its temperature changes nothing,
    while the same change with weight 1 does.
"""
import math

import pytest
import torch

import models
import pretrain
import train_consistency
import train_diffusion
import rundir

SIZE, DEPTH = 16, models.MODEL_CONFIGS["T"]["depth"]
COMMON = ["--model", "T", "--image-size", SIZE, "--batch-size", 4, "--device", "cpu", "--log-every", 1]


@pytest.fixture(scope="module")
def rcm(tmp_path_factory):
    torch.manual_seed(0)
    model = models.build_rcm("T", SIZE)
    path = tmp_path_factory.mktemp("rcm") / "rcm.pt"
    rundir.save_checkpoint(str(path), {"stage": "pretrain", "config": {"model": "T", "image_size": SIZE,
                                                                         "normalize": "simple"},
                                         "step": 0, "model": model.state_dict()})
    return str(path), {k: v.clone() for k, v in model.state_dict().items()}


def train(script, out, *argv):
    torch.set_num_threads(1)
    script.main([str(a) for a in [*COMMON, "--out", out, *argv]])
    return torch.load(f"{out}/ckpt_last.pt", map_location="cpu", weights_only=True)


def diffusion(rcm, out, *argv):
    return train(train_diffusion, out, "--init", rcm[0], "--sample-every", 0, "--eval-samples", 0, "--sample-steps", 2,
                 *argv)


def test_frozen_encoder_stays_bitwise_the_rcm_while_the_decoder_moves(rcm, tmp_path):
    state = diffusion(rcm, tmp_path / "frozen", "--steps", 3, "--freeze-encoder")
    encoder = {k: v for k, v in rcm[1].items() if k.startswith("encoder.")}
    for weights in ("model", "ema"):
        for name, value in encoder.items():
            assert torch.equal(state[weights][name], value), f"{weights}.{name}"
    assert state["model"]["out.weight"].abs().max() > 0                     # zero at init: the decoder learnt
    assert state["model"]["dec_blocks.0.adaLN_modulation.1.weight"].abs().max() > 0
    trained = sum(1 for k, v in models.build_epg("T", SIZE, 10).named_parameters() if not k.startswith("encoder."))
    assert len(state["optimizer"]["state"]) == trained                      # the encoder is not in the optimiser
    moved = diffusion(rcm, tmp_path / "default", "--steps", 3)              # the default does move it
    assert not torch.equal(moved["model"]["encoder.patch_embed.weight"], encoder["encoder.patch_embed.weight"])


def test_layer_wise_lr_decay_gives_each_encoder_block_its_documented_lr(rcm, tmp_path):
    lr = 1e-2
    state = diffusion(rcm, tmp_path / "lrd", "--steps", 2, "--lrd", 0.5, "--lr", lr, "--weight-decay", 0,
                      "--grad-clip", 0, "--betas", 0.9, 0.999)
    adam = math.sqrt(1 + 0.999) / (1 + 0.9)
    expected = {"encoder.patch_embed.weight": 0.5 ** (DEPTH + 1), "encoder.pos_embed": 0.5 ** (DEPTH + 1),
                **{f"encoder.blocks.{i}.mlp.0.weight": 0.5 ** (DEPTH - i) for i in range(DEPTH)},
                "encoder.norm.weight": 1.0}
    for name, scale in expected.items():
        step = (state["model"][name] - rcm[1][name]).abs().max().item()
        assert step == pytest.approx(lr * scale * adam, rel=1e-3), name


@pytest.mark.parametrize("weight, temperatures", [("--rc-weight", ("--tau1", "--tau2")),
                                                  ("--ctr-weight", ("--ctr-tau",))])
def test_a_pretraining_term_weighted_zero_contributes_no_gradient(weight, temperatures, tmp_path):
    run = lambda name, *argv: train(pretrain, tmp_path / name, "--steps", 1, "--probe-every", 0, *argv)["model"]
    change = [a for t in temperatures for a in (t, 0.7)]
    off, off_changed = run("off", weight, 0), run("off_changed", weight, 0, *change)
    on, on_changed = run("on"), run("on_changed", *change)
    assert all(torch.equal(off[k], off_changed[k]) for k in off)
    assert not all(torch.equal(on[k], on_changed[k]) for k in on)           # the temperature does act on the term


def test_consistency_without_the_auxiliary_loss_ignores_its_temperature(rcm, tmp_path):
    run = lambda name, *argv: train(train_consistency, tmp_path / name, "--init", rcm[0], "--steps", 1,
                                    "--eval-samples", 0, *argv)["model"]
    off, off_changed = run("off", "--aux-weight", 0), run("off_changed", "--aux-weight", 0, "--aux-tau", 0.7)
    on, on_changed = run("on"), run("on_changed", "--aux-tau", 0.7)
    assert all(torch.equal(off[k], off_changed[k]) for k in off)
    assert not all(torch.equal(on[k], on_changed[k]) for k in on)
