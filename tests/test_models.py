"""models.py against the paper's published numbers (Tables 7/8, Tables 1/2 GFLOPs) and structural invariants."""
import pytest
import torch

import models

# Table 7 (EPG) and Table 8 (RCM) shapes: (encoder depth = decoder depth, encoder width, decoder width), written
# here from the paper, not read from models.py; the printed parameter counts in millions (EPG-L/32 is listed as 540M
# in the paper, the /16 count, so it is only checked against the analytic count).
PAPER = {"S": (6, 768, 768), "B": (12, 768, 768), "L": (16, 1024, 1024), "XL": (12, 768, 1584),
         "XXL": (12, 768, 1920), "G": (12, 768, 2688)}
PRINTED = [("epg", "S", 256, 116), ("epg", "B", 256, 229), ("epg", "L", 256, 540), ("epg", "XL", 256, 583),
           ("epg", "XXL", 256, 789), ("epg", "G", 256, 1391), ("epg", "L", 512, None), ("rcm", "S", 256, 64),
           ("rcm", "B", 256, 106), ("rcm", "L", 256, 225)]


def block(d):
    """A pre-LN ViT block: qkv without bias 3d^2, out proj d^2 + d, MLP 4d^2 + 4d + 4d^2 + d, two LNs 4d."""
    return 12 * d * d + 10 * d


def encoder_params(d, depth, patch, tokens):
    """Patch conv 3 p^2 d + d, [CLS] d, positional table (tokens + [CLS] + time token) d, blocks, final LN 2d."""
    return 3 * patch * patch * d + d + d + (tokens + 2) * d + depth * block(d) + 2 * d


def decoder_params(de, dd, depth, patch, classes=1000):
    """Per block: the ViT block, skip Linear (de + dd) dd + dd and its LN 2 dd, adaLN-Zero Linear de -> 6 dd; then
    the encoder->decoder Linear when the widths differ, the class table (classes + null) x de, the output LN and
    the output Linear dd -> 3 p^2."""
    per_block = block(dd) + (de + dd) * dd + dd + 2 * dd + 6 * de * dd + 6 * dd
    bridge = de * dd + dd if de != dd else 0
    return depth * per_block + bridge + (classes + 1) * de + 2 * dd + dd * 3 * patch * patch + 3 * patch * patch


def projector_params(d, hidden=4096, out=256):
    """Linear d -> 4096 (no bias), BN, Linear 4096 -> 4096 (no bias), BN, Linear 4096 -> 256 (no bias)."""
    return d * hidden + 2 * hidden + hidden * hidden + 2 * hidden + hidden * out


@pytest.mark.parametrize("kind,name,size,printed", PRINTED)
def test_parameter_counts_match_tables_7_and_8(kind, name, size, printed):
    depth, de, dd = PAPER[name]
    patch = size // 16                                      # 16x16 tokens: /16 at 256^2, /32 at 512^2
    encoder = encoder_params(de, depth, patch, 256)
    expected = encoder + (decoder_params(de, dd, depth, patch) if kind == "epg" else projector_params(de))
    model = models.build_on_meta(kind, name, size)
    assert models.count_params(model) == expected
    assert models.count_params(model.encoder) == encoder                   # per module
    if printed is not None:   # the paper rounds (and for RCM-B truncates): within 1M of the printed figure
        assert abs(expected / 1e6 - printed) < 1.0


# Paper GFLOPs: Table 1 (EPG-XL/16 128, XXL/16 176, G/16 321), Table 2 (EPG-L/32 @512 113).
@pytest.mark.parametrize("name,size,paper_gflops", [("XL", 256, 128), ("XXL", 256, 176), ("G", 256, 321),
                                                    ("L", 512, 113)])
def test_gflops_match_paper(name, size, paper_gflops):
    macs = models.count_macs(models.build_on_meta("epg", name, size), size)
    assert abs(macs["linear"] / 1e9 - paper_gflops) / paper_gflops < 0.05


def test_mac_count_equals_hand_count_for_tiny_model():
    # EPG-T at 32^2: patch 4 -> N = 64 image tokens, T = 66 tokens, D = 128, depth 4 (independent arithmetic)
    D, T, N, depth, p = 128, 66, 64, 4, 4
    linear = (N * 3 * p * p * D                       # patch embedding conv
              + depth * 12 * D * D * T                # encoder: qkv 3D^2, proj D^2, MLP 8D^2 per token
              + depth * (12 * D * D + 2 * D * D) * T  # decoder blocks + skip Linear(2D -> D)
              + depth * D * 6 * D                     # adaLN: one vector per image
              + N * D * 3 * p * p)                    # output Linear on image tokens
    attention = 2 * depth * 2 * T * T * D             # QK^T and AV in encoder and decoder
    macs = models.count_macs(models.build_epg("T", 32, num_classes=10), 32)
    assert macs == {"linear": linear, "attention": attention}


@pytest.mark.parametrize("name", list(models.MODEL_CONFIGS))
def test_forward_shapes_every_size(name):
    size = 32 if name == "T" else 256
    B = 2
    x = torch.zeros(B, 3, size, size, device="meta")
    t = torch.zeros(B, device="meta")
    epg = models.build_on_meta("epg", name, size)
    assert epg(x, t, torch.zeros(B, dtype=torch.long, device="meta")).shape == (B, 3, size, size)
    rcm = models.build_on_meta("rcm", name, size)
    z, h = rcm(x, t)
    cfg = models.model_config(name)
    assert z.shape == (B, cfg["proj_dim"]) and h.shape == (B, cfg["enc_dim"])


def test_patch_32_at_512_gives_256_tokens():
    m = models.build_on_meta("epg", "L", 512)
    assert m.patch_size == 32 and m.encoder.num_patches == 256
    with pytest.raises(ValueError, match="divisible"):
        models.patch_size_for("B", 250)


def test_decoder_output_is_exactly_zero_at_init_and_gates_are_zero():
    torch.manual_seed(0)
    m = models.build_epg("T", 32, num_classes=10)
    out = m(torch.randn(3, 3, 32, 32), torch.randn(3) * 100, torch.tensor([0, 5, 10]))
    assert torch.equal(out, torch.zeros_like(out))
    for block in m.dec_blocks:
        gates = block.adaLN_modulation(torch.randn(3, 128))
        assert torch.equal(gates, torch.zeros_like(gates))


def test_wider_decoder_has_width_bridge_and_class_table_has_null_row():
    m = models.build_on_meta("epg", "XL", 256)
    assert isinstance(m.enc_to_dec, torch.nn.Linear) and m.enc_to_dec.out_features == 1584
    assert m.class_embed.num_embeddings == 1001
    assert isinstance(models.build_on_meta("epg", "B", 256).enc_to_dec, torch.nn.Identity)


def test_skips_are_mirrored_last_encoder_block_feeds_first_decoder_block():
    torch.manual_seed(0)
    m = models.build_epg("T", 32, num_classes=10)
    enc_out, dec_skip = [], []
    for b in m.encoder.blocks:
        b.register_forward_hook(lambda mod, i, o: enc_out.append(o))
    for b in m.dec_blocks:
        b.register_forward_pre_hook(lambda mod, args: dec_skip.append(args[1]))
    m(torch.randn(2, 3, 32, 32), torch.randn(2), torch.tensor([1, 2]))
    depth = len(m.encoder.blocks)
    for i in range(depth):
        assert dec_skip[i] is enc_out[depth - 1 - i]


def test_unpatchify_inverts_patch_layout():
    # build tokens from an image with the (p1, p2, c) per-token layout by explicit loops
    p, m = 4, 3
    img = torch.randn(2, 3, m * p, m * p)
    tokens = torch.zeros(2, m * m, p * p * 3)
    for a in range(m):
        for b in range(m):
            for p1 in range(p):
                for p2 in range(p):
                    for c in range(3):
                        tokens[:, a * m + b, (p1 * p + p2) * 3 + c] = img[:, c, a * p + p1, b * p + p2]
    assert torch.equal(models.unpatchify(tokens, p), img)


def test_layernorm_statistics_in_fp32_under_bf16_autocast():
    ln = models.LayerNorm(64)
    x = (torch.randn(4, 64) * 100 + 1000).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
    ref = torch.nn.functional.layer_norm(x.double(), (64,)).bfloat16()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref.float(), atol=1e-2)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    e = models.timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    assert torch.allclose(e[1, :4], torch.cos(3.0 * freqs)) and torch.allclose(e[1, 4:], torch.sin(3.0 * freqs))
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_decoder_dropout_only_in_decoder_attention():
    m = models.build_epg("T", 32, num_classes=10, decoder_dropout=0.5)
    assert all(b.attn.proj_drop.p == 0.5 for b in m.dec_blocks)
    assert all(b.attn.proj_drop.p == 0.0 for b in m.encoder.blocks)


def test_sincos_position_embedding_closed_form_and_relative_offsets():
    import math
    grid, dim = 5, 16
    emb = models.sincos_pos_embed_2d(grid, dim)
    assert emb.shape == (grid * grid, dim)
    q = dim // 4
    for r, c in [(0, 0), (1, 3), (4, 2)]:
        row = emb[r * grid + c]                         # row-major token order, like the patch embedding
        for k in range(q):
            w = 10000.0 ** (-k / q)
            expected = [math.sin(r * w), math.cos(r * w), math.sin(c * w), math.cos(c * w)]
            got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
            assert all(abs(float(g) - e) < 1e-6 for g, e in zip(got, expected))
    # the inner product of two positions depends only on their offset: sum_k cos(dr w_k) + cos(dc w_k)
    a, b = emb[1 * grid + 4], emb[3 * grid + 0]
    offset = sum(math.cos(-2 * 10000.0 ** (-k / q)) + math.cos(4 * 10000.0 ** (-k / q)) for k in range(q))
    assert abs(float(a @ b) - offset) < 1e-5


def test_position_embedding_init_official_for_paper_models_sincos_for_tiny():
    tiny = models.build_epg("T", 32, 10).encoder.pos_embed.detach()[0]          # (2 + 64, 128)
    assert torch.equal(tiny[:2], torch.zeros_like(tiny[:2]))                     # [CLS], [time]: no position
    assert torch.allclose(tiny[2:], models.sincos_pos_embed_2d(8, 128))
    assert models.build_rcm("T", 32).encoder.pos_embed.requires_grad             # still learnable
    torch.manual_seed(0)
    paper = models.build_rcm("S", 256).encoder.pos_embed.detach()                # official: trunc-normal(0.02)
    assert abs(float(paper.std()) - 0.02) < 1e-3 and abs(float(paper.mean())) < 1e-3


def test_qkv_initialisation_follows_the_official_code():
    """Xavier-uniform has variance 2 / (fan_in + fan_out): the EPG's fused (3D, D) qkv gets 2 / (4D) (one xavier over
    the fused matrix, as the official EPGViT), the RCM's q/k/v slices 2 / (2D) each (per slice, as MoCo v3)."""
    torch.manual_seed(0)
    D = models.MODEL_CONFIGS["T"]["dec_dim"]
    epg, rcm = models.build_epg("T", 32, 10), models.build_rcm("T", 32)
    for block in epg.dec_blocks:
        assert block.attn.qkv.weight.var().item() == pytest.approx(2 / (4 * D), rel=0.03)
    for block in rcm.encoder.blocks:
        assert block.attn.qkv.weight.var().item() == pytest.approx(2 / (2 * D), rel=0.03)
