"""GPU-only paths: bf16 autocast, torch.compile (inductor) against eager, flash attention for every paper head size,
identical dropout masks in the consistency step under compile, and no host synchronisation inside a training step.
Skipped without CUDA; `make gpu-check` runs them first."""
import functools

import pytest
import torch
import torch.nn.functional as F

import losses
import models
import pretrain
import train_consistency
import train_diffusion
import rundir
import trainlib

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_epg(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = models.build_epg("T", 32, num_classes=10, decoder_dropout=dropout).cuda()
    for p in model.parameters():                     # non-zero gates and output layer: the comparison means something
        p.data.normal_(0, 0.02)
    return model


@cuda
def test_bf16_forward_matches_fp32():
    model = random_epg()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    sigma = torch.rand(4, device="cuda") * 10 + 0.01
    y = torch.randint(0, 11, (4,), device="cuda")
    ref = losses.denoise(model, x, sigma, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = losses.denoise(model, x, sigma, y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3      # bf16: ~3 significant digits


@cuda
def test_compiled_model_matches_eager_in_outputs_gradients_and_an_optimiser_step():
    eager, compiled_copy = random_epg(), random_epg()
    compiled = torch.compile(compiled_copy)
    x, c = torch.randn(4, 3, 32, 32, device="cuda"), torch.randn(4, device="cuda")
    y = torch.randint(0, 11, (4,), device="cuda")
    outs = []
    for net, params in ((eager, eager), (compiled, compiled_copy)):
        out = net(x, c, y)
        out.square().mean().backward()
        opt = torch.optim.AdamW(params.parameters(), lr=1e-3)
        opt.step()
        outs.append((out.detach(), [p.grad for p in params.parameters()], [p.detach() for p in params.parameters()]))
    (o1, g1, w1), (o2, g2, w2) = outs
    assert o1.abs().max() > 1e-3 and torch.allclose(o1, o2, rtol=1e-3, atol=1e-4)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-5)
    for a, b in zip(w1, w2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@cuda
@pytest.mark.parametrize("name,heads,dim", [("S/B", 12, 768), ("L", 16, 1024), ("XL decoder", 22, 1584),
                                            ("XXL decoder", 16, 1920), ("G decoder", 21, 2688)])
def test_flash_attention_kernel_runs_every_paper_head_size(name, heads, dim):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, heads, 258, dim // heads, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # raises if flash cannot run this shape
        out = F.scaled_dot_product_attention(q, q, q)
    ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float())
    assert (out.float() - ref).abs().max() < 2e-2, name


@cuda
def test_consistency_target_and_online_passes_draw_identical_dropout_masks_under_compile():
    model = random_epg(dropout=0.5).train()
    net = torch.compile(model)
    calls = []

    def recorded(x_in, c, y):
        calls.append(net(x_in, c, y))
        return calls[-1]

    x0, y = torch.randn(3, 3, 32, 32, device="cuda"), torch.tensor([1, 2, 3], device="cuda")
    sigma = torch.tensor([0.5, 1.0, 3.0], device="cuda")
    for _ in range(2):                                 # the second time runs the compiled kernels only
        calls.clear()
        losses.consistency_loss(recorded, recorded, x0, y, sigma, sigma, torch.randn_like(x0), 0.001,
                                rng_devices=[torch.cuda.current_device()])
        assert torch.equal(calls[0], calls[1].detach())
    c = losses.c_noise(sigma)
    assert not torch.equal(net(x0, c, y), net(x0, c, y))          # dropout does act


@cuda
@pytest.mark.parametrize("name", ["pretrain", "diffusion", "consistency"])
def test_no_host_synchronisation_inside_a_training_step(name, tmp_path, monkeypatch):
    """Three compiled bf16 steps at tiny size; the second (neither a log, probe nor checkpoint step) runs under
    torch.cuda.set_sync_debug_mode('error'), which raises on any synchronising CUDA call."""
    torch.manual_seed(0)
    rcm = str(tmp_path / "rcm.pt")
    rundir.save_checkpoint(rcm, {"stage": "pretrain", "config": {"model": "T", "image_size": 32}, "step": 0,
                                   "model": models.build_rcm("T", 32).state_dict()})
    seed_step = trainlib.seed_step

    def strict_second_step(seed, step, rank):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step == 1 else "default")
        seed_step(seed, step, rank)

    monkeypatch.setattr(trainlib, "seed_step", strict_second_step)
    script = {"pretrain": pretrain, "diffusion": train_diffusion, "consistency": train_consistency}[name]
    args = ["--model", "T", "--batch-size", 8, "--steps", 3, "--log-every", 3, "--ckpt-every", 3, "--compile",
            "--out", tmp_path / "out", "--num-workers", 0]
    args += {"pretrain": ["--probe-every", 0], "diffusion": ["--init", rcm, "--sample-every", 0, "--eval-samples", 0],
             "consistency": ["--init", rcm, "--eval-samples", 0]}[name]
    try:
        rundir.cli_main(functools.partial(script.main, [str(a) for a in args]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.load(tmp_path / "out" / "ckpt_last.pt", weights_only=True)["step"] == 3
