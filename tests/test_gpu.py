"""GPU-only paths (bf16 autocast, torch.compile, flash attention). Skipped without CUDA; run them on a GPU machine."""
import pytest
import torch
import torch.nn.functional as F

import losses
import models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_bf16_forward_matches_fp32():
    torch.manual_seed(0)
    model = models.build_epg("T", 32, num_classes=10).cuda()
    for p in model.parameters():                     # non-zero output layer so the comparison means something
        p.data.normal_(0, 0.02)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    sigma = torch.rand(4, device="cuda") * 10 + 0.01
    y = torch.randint(0, 11, (4,), device="cuda")
    ref = losses.denoise(model, x, sigma, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = losses.denoise(model, x, sigma, y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


@cuda
def test_compiled_model_matches_eager_and_trains():
    torch.manual_seed(0)
    model = models.build_epg("T", 32, num_classes=10).cuda()
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    c = torch.randn(4, device="cuda")
    y = torch.randint(0, 11, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x, c, y)
        out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()


@cuda
def test_flash_attention_kernel_is_used_for_paper_head_dims():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for head_dim in (64, 72, 120, 128):              # S/B/L, XL, XXL, G
        q = torch.randn(2, 4, 258, head_dim, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):   # raises if flash cannot run this shape
            out = F.scaled_dot_product_attention(q, q, q)
        ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float())
        assert (out.float() - ref).abs().max() < 2e-2
