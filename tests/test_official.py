"""tools/official.py: the authors' released state dicts convert into checkpoints of ours that compute what the official
model computes.

No released weights exist here, so the tests build state dicts in the official layout themselves, from the official
module names written down below (RCMViT / EPGViT of the official `rcm/vit.py`), and check:
  * conversion uses every official tensor exactly once and fills every one of ours (tiny and full-size layouts);
  * our forward equals a forward re-derived here in plain tensor algebra from the official tensors, by official name
    (patchify, encoder block, decoder block with skip and adaLN, head, unpatchify, projector with eval BatchNorm),
    also for the model rebuilt from a file written by `python tools/official.py convert` (read with weights_only);
  * a missing, extra or wrong-shaped tensor, or an unusable path, gives one line (OfficialCheckpointError, exit 2);
  * the sizes inferred for the released models, and their parameter counts against the paper's Tables 7 and 8;
  * the official time input 250 ln(sigma + 1e-44) equals ours bit for bit on the sampler grids.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import official  # noqa: E402
import rundir  # noqa: E402

# Two tiny configurations registered for the tests, like B (RCM-B) and XL (same encoder, wider decoder) in the paper:
# "TW" has a decoder wider than its encoder, so the width bridge (encoder_to_decoder) is exercised; "TR" mirrors the
# encoder and names the RCM.
TINY = dict(depth=2, enc_dim=32, enc_heads=2, dec_dim=48, dec_heads=3, tokens_per_side=4, proj_hidden=64, proj_dim=16)
TINY_RCM = dict(TINY, dec_dim=32, dec_heads=2)
TINY_IMAGE, TINY_PATCH = 16, 4


@pytest.fixture
def tiny_config(monkeypatch):
    monkeypatch.setitem(models.MODEL_CONFIGS, "TR", TINY_RCM)
    monkeypatch.setitem(models.MODEL_CONFIGS, "TW", TINY)
    return TINY


# ----------------------------------------------------------------------------------------------------------------
# State dicts in the official layout, by official name
# ----------------------------------------------------------------------------------------------------------------
def _maker(generator, device):
    def tensor(*shape, scale=1.0, offset=0.0):
        if device == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator) * scale + offset
    return tensor


def _linear(sd, t, name, fan_in, fan_out, bias=True, gain=1.0):
    sd[f"{name}.weight"] = t(fan_out, fan_in, scale=gain / math.sqrt(fan_in))
    if bias:
        sd[f"{name}.bias"] = t(fan_out, scale=0.1)


def _layer_norm(sd, t, name, dim):
    sd[f"{name}.weight"] = t(dim, scale=0.1, offset=1.0)
    sd[f"{name}.bias"] = t(dim, scale=0.1)


def official_encoder(depth, dim, patch, image, t):
    """RCMViT / EPGViT encoder tensors: PatchEmbed.proj (Conv2d), cls_token, pos_embed, Block x depth, norm."""
    sd = {"patch_embed.proj.weight": t(dim, 3, patch, patch, scale=1 / math.sqrt(3 * patch * patch)),
          "patch_embed.proj.bias": t(dim, scale=0.1),
          "cls_token": t(1, 1, dim, scale=0.3),
          "pos_embed": t(1, 2 + (image // patch) ** 2, dim, scale=0.3)}
    for i in range(depth):
        _layer_norm(sd, t, f"blocks.{i}.norm1", dim)
        _linear(sd, t, f"blocks.{i}.attn.qkv", dim, 3 * dim, bias=False)       # qkv_bias=False
        _linear(sd, t, f"blocks.{i}.attn.proj", dim, dim)
        _layer_norm(sd, t, f"blocks.{i}.norm2", dim)
        _linear(sd, t, f"blocks.{i}.mlp.fc1", dim, 4 * dim)
        _linear(sd, t, f"blocks.{i}.mlp.fc2", 4 * dim, dim)
    _layer_norm(sd, t, "norm", dim)
    return sd


def official_rcm(depth, dim, patch, image, hidden, out, generator=None, device="cpu"):
    """RCMViT: encoder + projection_head = Sequential(Linear, BN, ReLU, Linear, BN, ReLU, Linear), no Linear bias."""
    t = _maker(generator, device)
    sd = official_encoder(depth, dim, patch, image, t)
    for index, fan_in, fan_out in ((0, dim, hidden), (3, hidden, hidden), (6, hidden, out)):
        _linear(sd, t, f"projection_head.{index}", fan_in, fan_out, bias=False)
    for index in (1, 4):
        _layer_norm(sd, t, f"projection_head.{index}", hidden)
        sd[f"projection_head.{index}.running_mean"] = t(hidden, scale=0.2)
        sd[f"projection_head.{index}.running_var"] = t(hidden, scale=0.1, offset=1.0).abs()
        sd[f"projection_head.{index}.num_batches_tracked"] = torch.tensor(7, device=device)
    return sd


def official_epg(depth, enc_dim, dec_dim, patch, image, num_classes=10, generator=None, device="cpu"):
    """EPGViT: encoder + class_embed + encoder_to_decoder (widths differ) + DecoderBlock x depth + out_norm + out.
    num_classes=None: the unconditional first-release layout without a class table."""
    t = _maker(generator, device)
    sd = official_encoder(depth, enc_dim, patch, image, t)
    if num_classes is not None:
        sd["class_embed.weight"] = t(num_classes + 1, enc_dim, scale=0.5)
    if dec_dim != enc_dim:
        _linear(sd, t, "encoder_to_decoder", enc_dim, dec_dim)
    for i in range(depth):
        _linear(sd, t, f"decoder_blocks.{i}.skip_linear", dec_dim + enc_dim, dec_dim)
        _layer_norm(sd, t, f"decoder_blocks.{i}.skip_norm", dec_dim)
        _layer_norm(sd, t, f"decoder_blocks.{i}.norm1", dec_dim)
        _linear(sd, t, f"decoder_blocks.{i}.attn.qkv", dec_dim, 3 * dec_dim, bias=False)
        _linear(sd, t, f"decoder_blocks.{i}.attn.proj", dec_dim, dec_dim)
        _layer_norm(sd, t, f"decoder_blocks.{i}.norm2", dec_dim)
        _linear(sd, t, f"decoder_blocks.{i}.mlp.fc1", dec_dim, 4 * dec_dim)
        _linear(sd, t, f"decoder_blocks.{i}.mlp.fc2", 4 * dec_dim, dec_dim)
        _linear(sd, t, f"decoder_blocks.{i}.adaLN_modulation.1", enc_dim, 6 * dec_dim, gain=0.5)
    _layer_norm(sd, t, "out_norm", dec_dim)
    _linear(sd, t, "out", dec_dim, patch * patch * 3)
    return sd


def tiny_epg(num_classes=10, seed=0):
    return official_epg(TINY["depth"], TINY["enc_dim"], TINY["dec_dim"], TINY_PATCH, TINY_IMAGE, num_classes,
                        torch.Generator().manual_seed(seed))


def tiny_rcm(seed=0):
    return official_rcm(TINY["depth"], TINY["enc_dim"], TINY_PATCH, TINY_IMAGE, TINY["proj_hidden"],
                        TINY["proj_dim"], torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# The official forward, re-derived in float64 from the official tensors
# ----------------------------------------------------------------------------------------------------------------
def ref_layer_norm(x, sd, name, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def ref_linear(x, sd, name):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_attention(x, sd, name, heads):
    """Official Attention ('math' mode): qkv output split as (3, heads, head_dim), softmax(q k^T / sqrt(d)) v."""
    B, L, D = x.shape
    d = D // heads
    qkv = ref_linear(x, sd, f"{name}.qkv").reshape(B, L, 3, heads, d)
    q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))               # (B, heads, L, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return ref_linear((weights @ v).transpose(1, 2).reshape(B, L, D), sd, f"{name}.proj")


def ref_mlp(x, sd, name):
    return ref_linear(ref_gelu(ref_linear(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")


def ref_encoder_block(x, sd, i, heads):
    """Block: pre-LN, x += Attn(norm1(x)); x += Mlp(norm2(x))."""
    x = x + ref_attention(ref_layer_norm(x, sd, f"blocks.{i}.norm1"), sd, f"blocks.{i}.attn", heads)
    return x + ref_mlp(ref_layer_norm(x, sd, f"blocks.{i}.norm2"), sd, f"blocks.{i}.mlp")


def ref_decoder_block(x, skip, cond, sd, i, heads):
    """DecoderBlock: skip_norm(skip_linear([x ; skip])), then adaLN-Zero with chunks (shift, scale, gate) x 2."""
    name = f"decoder_blocks.{i}"
    x = ref_layer_norm(ref_linear(torch.cat([x, skip], dim=-1), sd, f"{name}.skip_linear"), sd, f"{name}.skip_norm")
    mod = ref_linear(cond * torch.sigmoid(cond), sd, f"{name}.adaLN_modulation.1")[:, None]   # SiLU then Linear
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
    x = x + gate1 * ref_attention(ref_layer_norm(x, sd, f"{name}.norm1") * (1 + scale1) + shift1, sd,
                                  f"{name}.attn", heads)
    return x + gate2 * ref_mlp(ref_layer_norm(x, sd, f"{name}.norm2") * (1 + scale2) + shift2, sd, f"{name}.mlp")


def ref_time_embedding(c_noise, dim):
    """The official sinusoid, in fp32 as the official code computes it: [cos(c f), sin(c f)], f_k = 1e4^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()


def ref_patchify(x, sd, patch):
    """The patch Conv2d (kernel = stride = p) as a matrix product over raster-ordered patches, channels (c, i, j)."""
    B, C, H, W = x.shape
    m = H // patch
    patches = x.reshape(B, C, m, patch, m, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, m * m, C * patch * patch)
    weight = sd["patch_embed.proj.weight"]
    return patches @ weight.reshape(weight.shape[0], -1).T + sd["patch_embed.proj.bias"]


def ref_unpatchify(tokens, patch):
    """'b (m n) (p1 p2 c) -> b c (m p1) (n p2)', written out element by element."""
    B, N, _ = tokens.shape
    m = math.isqrt(N)
    image = torch.zeros(B, 3, m * patch, m * patch, dtype=tokens.dtype)
    for row in range(m):
        for col in range(m):
            for p1 in range(patch):
                for p2 in range(patch):
                    for c in range(3):
                        token_channel = (p1 * patch + p2) * 3 + c
                        image[:, c, row * patch + p1, col * patch + p2] = tokens[:, row * m + col, token_channel]
    return image


def ref_encoder(x, c_noise, sd, heads, class_emb=None):
    """[CLS (+ class embedding)] [time sinusoid] [patches] + pos_embed -> blocks; returns (final LN tokens, skips)."""
    B, D = x.shape[0], sd["cls_token"].shape[-1]
    cls = sd["cls_token"].expand(B, 1, D)
    if class_emb is not None:
        cls = cls + class_emb[:, None]
    time = ref_time_embedding(c_noise, D)
    h = torch.cat([cls, time[:, None], ref_patchify(x, sd, sd["patch_embed.proj.weight"].shape[-1])], dim=1)
    h = h + sd["pos_embed"]
    skips = []
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        h = ref_encoder_block(h, sd, i, heads)
        skips.append(h)
    return ref_layer_norm(h, sd, "norm"), skips, time


def ref_epg_forward(x, c_noise, y, sd, enc_heads, dec_heads):
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    class_emb = sd["class_embed.weight"][y] if "class_embed.weight" in sd else None
    h, skips, time = ref_encoder(x, c_noise, sd, enc_heads, class_emb)
    cond = time + class_emb if class_emb is not None else time
    if "encoder_to_decoder.weight" in sd:
        h = ref_linear(h, sd, "encoder_to_decoder")
    for i in range(len(skips)):
        h = ref_decoder_block(h, skips.pop(), cond, sd, i, dec_heads)          # skips popped last-in first-out
    h = ref_linear(ref_layer_norm(h[:, 2:], sd, "out_norm"), sd, "out")
    return ref_unpatchify(h, sd["patch_embed.proj.weight"].shape[-1])


def ref_rcm_forward(x, c_noise, sd, heads, eps=1e-5):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    h, _, _ = ref_encoder(x.double(), c_noise, sd, heads)
    feature = h[:, 0]
    z = feature
    for linear, bn in ((0, 1), (3, 4)):                                       # BatchNorm1d in eval mode
        z = z @ sd[f"projection_head.{linear}.weight"].T
        z = (z - sd[f"projection_head.{bn}.running_mean"]) / torch.sqrt(sd[f"projection_head.{bn}.running_var"] + eps)
        z = torch.relu(z * sd[f"projection_head.{bn}.weight"] + sd[f"projection_head.{bn}.bias"])
    return z @ sd["projection_head.6.weight"].T, feature


def _inputs(image, batch=3, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image, image, generator=g)
    sigma = torch.tensor([0.01, 1.0, 60.0][:batch]) * image / 64
    y = torch.tensor([0, num_classes, 3][:batch])                             # includes the null class
    return x, losses.c_noise(sigma), y


# ----------------------------------------------------------------------------------------------------------------
# Conversion + forward equality
# ----------------------------------------------------------------------------------------------------------------
def test_epg_conversion_uses_every_tensor_once_and_matches_the_official_forward(tiny_config):
    sd = tiny_epg()
    config, state = official.convert_state_dict(sd)
    assert (config["kind"], config["model"], config["image_size"], config["patch_size"], config["num_classes"]) == \
        ("epg", "TW", TINY_IMAGE, TINY_PATCH, 10)
    assert len(state) == len(sd)
    assert {id(v) for v in state.values()} == {id(v) for v in sd.values()}   # each official tensor exactly once
    model = official.build_model(config).eval()
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)

    x, c_noise, y = _inputs(TINY_IMAGE)
    with torch.no_grad():
        ours = model(x, c_noise, y)
    expected = ref_epg_forward(x, c_noise, y, sd, TINY["enc_heads"], TINY["dec_heads"])
    assert expected.abs().mean() > 0.1                                         # a non-trivial output
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)


def test_equal_width_epg_matches_the_official_forward(tiny_config):
    """Equal encoder and decoder widths (no encoder_to_decoder, our width bridge is the identity)."""
    sd = official_epg(TINY_RCM["depth"], TINY_RCM["enc_dim"], TINY_RCM["dec_dim"], TINY_PATCH, TINY_IMAGE, 10,
                      torch.Generator().manual_seed(3))
    assert not any(k.startswith("encoder_to_decoder") for k in sd)
    config, state = official.convert_state_dict(sd)
    assert config["model"] == "TR"
    model = official.build_model(config).eval()
    model.load_state_dict(state, strict=True)
    x, c_noise, y = _inputs(TINY_IMAGE)
    with torch.no_grad():
        ours = model(x, c_noise, y)
    expected = ref_epg_forward(x, c_noise, y, sd, TINY_RCM["enc_heads"], TINY_RCM["dec_heads"])
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)


def test_model_t_layout_is_recognised():
    cfg = models.model_config("T")
    sd = official_epg(cfg["depth"], cfg["enc_dim"], cfg["dec_dim"], 4, 32, 10, torch.Generator().manual_seed(3))
    config, state = official.convert_state_dict(sd)
    assert (config["model"], config["image_size"], config["patch_size"]) == ("T", 32, 4)
    official.build_model(config).load_state_dict(state, strict=True)


def test_unconditional_official_epg_converts_with_a_zero_null_row(tiny_config):
    """The first-release consistency layout has no class table (the official forward adds no class embedding)."""
    sd = tiny_epg(num_classes=None)
    config, state = official.convert_state_dict(sd)
    assert config["num_classes"] == 0
    assert torch.equal(state["class_embed.weight"], torch.zeros(1, TINY["enc_dim"]))
    model = official.build_model(config).eval()
    model.load_state_dict(state, strict=True)
    x, c_noise, _ = _inputs(TINY_IMAGE)
    y = torch.zeros(3, dtype=torch.long)                                       # the only label: null class 0
    with torch.no_grad():
        ours = model(x, c_noise, y)
    torch.testing.assert_close(ours.double(), ref_epg_forward(x, c_noise, y, sd, TINY["enc_heads"], TINY["dec_heads"]),
                               rtol=1e-4, atol=1e-4)
    stage, normalize, sampling = official.official_sampling(config)
    assert normalize == "simple" and "cfg_scale" not in sampling


def test_rcm_conversion_matches_the_official_forward(tiny_config):
    sd = tiny_rcm()
    config, state = official.convert_state_dict(sd)
    assert (config["kind"], config["model"], config["proj_dim"], config["num_classes"]) == ("rcm", "TR", 16, None)
    assert len(state) == len(sd) and {id(v) for v in state.values()} == {id(v) for v in sd.values()}
    model = official.build_model(config).eval()
    model.load_state_dict(state, strict=True)
    x, c_noise, _ = _inputs(TINY_IMAGE)
    with torch.no_grad():
        projection, feature = model(x, c_noise)
    ref_projection, ref_feature = ref_rcm_forward(x, c_noise, sd, TINY["enc_heads"])
    torch.testing.assert_close(feature.double(), ref_feature, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(projection.double(), ref_projection, rtol=1e-4, atol=1e-4)
    assert model.projector[1].num_batches_tracked.item() == 7                 # BatchNorm buffers carried over


# ----------------------------------------------------------------------------------------------------------------
# The released models, full size (meta tensors: shapes only, no memory)
# ----------------------------------------------------------------------------------------------------------------
# (our name, depth, encoder width, decoder width, patch, image size, parameters in the paper's Table 7 (M) or None)
RELEASED_EPG = [("XL", 12, 768, 1584, 16, 256, 583), ("XXL", 12, 768, 1920, 16, 256, 789),
                ("G", 12, 768, 2688, 16, 256, 1391), ("L", 16, 1024, 1024, 16, 256, 540),
                ("L", 16, 1024, 1024, 32, 512, None)]
# (our name, depth, width, patch, image size, projector output, parameters in Table 8 (M) or None)
RELEASED_RCM = [("B", 12, 768, 16, 256, 256, 106), ("B", 12, 768, 32, 512, 256, None),
                ("L", 16, 1024, 16, 256, 256, 225), ("B", 12, 768, 16, 256, 768, None)]


def _parameters_millions(sd):
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(v.numel() for k, v in sd.items() if not k.endswith(buffers)) / 1e6


def _assert_same_layout(state, model):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == ours


@pytest.mark.parametrize("name,depth,enc_dim,dec_dim,patch,image,paper_m", RELEASED_EPG)
def test_released_epg_layouts_convert_one_to_one(name, depth, enc_dim, dec_dim, patch, image, paper_m):
    sd = official_epg(depth, enc_dim, dec_dim, patch, image, num_classes=1000, device="meta")
    if paper_m is not None:
        assert abs(_parameters_millions(sd) - paper_m) < 1.0                  # Table 7 (class table of 1001 rows)
    config, state = official.convert_state_dict(sd)
    assert (config["kind"], config["model"], config["image_size"], config["patch_size"], config["num_classes"]) == \
        ("epg", name, image, patch, 1000)
    assert len(state) == len(sd)
    _assert_same_layout(state, models.build_on_meta("epg", name, image, 1000))


@pytest.mark.parametrize("name,depth,dim,patch,image,out,paper_m", RELEASED_RCM)
def test_released_rcm_layouts_convert_one_to_one(name, depth, dim, patch, image, out, paper_m):
    sd = official_rcm(depth, dim, patch, image, 4096, out, device="meta")
    if paper_m is not None:
        assert abs(_parameters_millions(sd) - paper_m) < 1.0                  # Table 8 (projector output 256)
    config, state = official.convert_state_dict(sd)
    assert (config["kind"], config["model"], config["image_size"], config["proj_dim"]) == ("rcm", name, image, out)
    assert len(state) == len(sd)
    with torch.device("meta"):
        _assert_same_layout(state, models.build_rcm(name, image, out))


# ----------------------------------------------------------------------------------------------------------------
# Bad state dicts: one-line messages naming the tensors
# ----------------------------------------------------------------------------------------------------------------
def _conversion_error(sd):
    with pytest.raises(official.OfficialCheckpointError) as info:
        official.convert_state_dict(sd)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    return message


def test_missing_tensor_is_named(tiny_config):
    sd = tiny_epg()
    del sd["decoder_blocks.1.skip_norm.weight"]
    message = _conversion_error(sd)
    assert "1 missing" in message and "decoder_blocks.1.skip_norm.weight" in message


def test_extra_tensors_are_named(tiny_config):
    sd = tiny_epg()
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(3 * TINY["enc_dim"])            # qkv_bias=True: ours has none
    sd["time_embed.0.weight"] = torch.zeros(4 * TINY["enc_dim"], TINY["enc_dim"])  # old optional time MLP
    message = _conversion_error(sd)
    assert "2 unexpected" in message and "blocks.0.attn.qkv.bias" in message and "time_embed.0.weight" in message
    assert "missing" not in message


def test_wrong_shaped_tensor_is_named_with_both_shapes(tiny_config):
    sd = tiny_epg()
    sd["decoder_blocks.0.adaLN_modulation.1.weight"] = torch.zeros(6 * TINY["dec_dim"], 40)
    message = _conversion_error(sd)
    assert "decoder_blocks.0.adaLN_modulation.1.weight (288, 40) vs (288, 32)" in message
    assert "missing" not in message and "unexpected" not in message


def test_unknown_sizes_and_foreign_state_dicts_are_refused(tiny_config):
    odd = official_epg(2, 40, 40, 4, 16, 10, torch.Generator().manual_seed(0))   # width 40: no configuration
    assert "matches none of our model configurations" in _conversion_error(odd)
    uneven = tiny_epg()
    uneven = {k: v for k, v in uneven.items() if not k.startswith("decoder_blocks.1.")}   # decoder shallower
    assert "matches none" in _conversion_error(uneven)
    ours = official.build_model(official.infer_official_config(tiny_epg())).state_dict()
    assert not official.is_official_state_dict(ours)
    assert not official.is_official_state_dict({"stage": "diffusion", "config": {}, "model": ours})
    assert "not an official" in _conversion_error(ours)


# ----------------------------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------------------------
def test_rcm_saved_without_projector_converts_to_its_encoder(tiny_config):
    sd = {k: v for k, v in tiny_rcm().items() if not k.startswith("projection_head.")}
    config, state = official.convert_state_dict(sd)
    assert (config["kind"], config["model"], config["proj_dim"]) == ("rcm", "TR", None)
    assert len(state) == len(sd) and all(k.startswith("encoder.") for k in state)
    models.load_encoder_from_rcm(models.build_epg("TW", TINY_IMAGE, 10), state)


def convert_cli(*args):
    """`python tools/official.py convert ARGS` in process; returns the file read back with weights_only=True."""
    official.main(["convert", *map(str, args)])
    return torch.load(args[1], map_location="cpu", weights_only=True)


def test_convert_writes_an_epg_checkpoint_that_computes_the_official_forward(tiny_config, tmp_path, capsys):
    online = tiny_epg(seed=0)
    ema = tiny_epg(seed=1)
    torch.save(online, tmp_path / "nnet.pth")
    torch.save({f"module.{k}": v for k, v in ema.items()}, tmp_path / "nnet_ema.pth")   # a DDP-prefixed save
    ckpt = convert_cli(tmp_path, tmp_path / "epg.pt")
    assert "wrote" in capsys.readouterr().out
    assert set(ckpt) == {"stage", "config", "step", "model", "ema"}
    assert (ckpt["stage"], ckpt["step"]) == ("diffusion", 0)
    assert ckpt["config"] == {"model": "TW", "image_size": TINY_IMAGE, "patch_size": TINY_PATCH, "num_classes": 10,
                              "normalize": "imagenet", "converted_from": str(tmp_path / "nnet_ema.pth"),
                              "sampling": official.OFFICIAL_SAMPLING["diffusion"]}
    assert rundir.load_checkpoint(str(tmp_path / "epg.pt"), ("diffusion", "consistency"))["stage"] == "diffusion"
    # rebuilt from the file alone, it computes the official forward of the EMA weights (by official names)
    cfg = ckpt["config"]
    model = models.build_epg(cfg["model"], cfg["image_size"], cfg["num_classes"]).eval()
    model.load_state_dict(ckpt["ema"], strict=True)
    x, c_noise, y = _inputs(TINY_IMAGE)
    with torch.no_grad():
        ours = model(x, c_noise, y)
    torch.testing.assert_close(ours.double(), ref_epg_forward(x, c_noise, y, ema, TINY["enc_heads"], TINY["dec_heads"]),
                               rtol=1e-4, atol=1e-4)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in ckpt["ema"].items())      # the chosen weights, once
    one_copy = sum(v.numel() * v.element_size() for v in ema.values())
    assert os.path.getsize(tmp_path / "epg.pt") < 1.5 * one_copy

    ckpt = convert_cli(tmp_path, tmp_path / "online.pt", "--weights", "online")
    assert ckpt["config"]["converted_from"] == str(tmp_path / "nnet.pth")
    assert torch.equal(ckpt["ema"]["out.bias"], online["out.bias"])


def test_convert_writes_an_rcm_checkpoint_for_init(tiny_config, tmp_path):
    online = tiny_rcm(seed=0)
    torch.save(online, tmp_path / "nnet.pth")
    torch.save(tiny_rcm(seed=1), tmp_path / "nnet_ema.pth")
    ckpt = convert_cli(tmp_path, tmp_path / "rcm.pt")          # an RCM folder: nnet.pth, as the official fine-tuning
    assert set(ckpt) == {"stage", "config", "step", "model"} and (ckpt["stage"], ckpt["step"]) == ("pretrain", 0)
    assert ckpt["config"] == {"model": "TR", "image_size": TINY_IMAGE, "patch_size": TINY_PATCH, "proj_dim": 16,
                              "normalize": "imagenet", "converted_from": str(tmp_path / "nnet.pth")}
    rundir.load_checkpoint(str(tmp_path / "rcm.pt"), "pretrain")
    rcm = models.build_rcm("TR", TINY_IMAGE, 16).eval()
    rcm.load_state_dict(ckpt["model"], strict=True)
    x, c_noise, _ = _inputs(TINY_IMAGE)
    with torch.no_grad():
        projection, _ = rcm(x, c_noise)
    torch.testing.assert_close(projection.double(), ref_rcm_forward(x, c_noise, online, TINY["enc_heads"])[0],
                               rtol=1e-4, atol=1e-4)
    transferred = models.load_encoder_from_rcm(models.build_epg("TW", TINY_IMAGE, 10), ckpt["model"])   # --init
    assert len(transferred) == sum(not k.startswith("projection_head.") for k in online)


def test_convert_errors_are_one_line_with_exit_2(tiny_config, tmp_path, capsys, monkeypatch):
    def error(src, out):
        with pytest.raises(SystemExit) as exit_info:
            official.main(["convert", str(src), str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    torch.save(tiny_epg(), tmp_path / "nnet_ema.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    torch.save({"stage": "diffusion", "config": {}, "model": {"encoder.pos_embed": torch.zeros(1)}},
               tmp_path / "ours.pt")
    incomplete = tiny_epg()
    del incomplete["decoder_blocks.1.skip_norm.weight"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    out = tmp_path / "out.pt"
    assert "does not exist" in error(tmp_path / "absent", out)
    assert "neither nnet_ema.pth nor nnet.pth" in error(tmp_path / "empty", out)
    assert "unreadable or corrupt" in error(tmp_path / "corrupt.pth", out)
    assert "not an official" in error(tmp_path / "ours.pt", out)
    assert "1 missing [decoder_blocks.1.skip_norm.weight]" in error(tmp_path / "incomplete.pth", out)
    assert "already exists" in error(tmp_path, tmp_path / "exists.pt")
    assert "does not exist" in error(tmp_path, tmp_path / "no" / "out.pt")

    def save_until_the_disk_is_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(official.torch, "save", save_until_the_disk_is_full)
    assert "could not write" in error(tmp_path, out)
    assert (tmp_path / "exists.pt").read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pth", "empty", "exists.pt", "incomplete.pth", "nnet_ema.pth",
                                            "ours.pt"]               # nothing written, no temporary file left


def test_convert_killed_while_writing_leaves_no_output(tmp_path):
    cfg = models.model_config("T")                            # a registered size: the child process sees no TW
    torch.save(official_epg(cfg["depth"], cfg["enc_dim"], cfg["dec_dim"], 4, 32, 10, torch.Generator().manual_seed(0)),
               tmp_path / "nnet_ema.pth")
    killed_mid_write = ("import os, sys, official\n"
                        "def save(obj, f):\n"
                        "    f.write(b'partial'); f.flush(); os._exit(9)\n"           # no cleanup runs, as SIGKILL
                        "official.torch.save = save\n"
                        "official.main(['convert', sys.argv[1], sys.argv[2]])\n")
    result = subprocess.run([sys.executable, "-c", killed_mid_write, str(tmp_path), str(tmp_path / "out.pt")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "tools")},
                            capture_output=True, timeout=120)
    assert result.returncode == 9
    assert not (tmp_path / "out.pt").exists()                 # only a temporary file is left
    result = subprocess.run([sys.executable, os.path.join("tools", "official.py"), "convert", str(tmp_path),
                             str(tmp_path / "out.pt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"wrote {tmp_path / 'out.pt'}: EPG-T/4"), result.stderr
    assert rundir.load_checkpoint(str(tmp_path / "out.pt"), "diffusion")["config"]["model"] == "T"


# ----------------------------------------------------------------------------------------------------------------
# Sampling behaviour of the official code
# ----------------------------------------------------------------------------------------------------------------
def _official_sampler_sigmas(steps, image_size):
    """The official sampler's grid: float32 linspace ramp, Karras rho = 7 from 80 to 0.002, times image_size / 64."""
    ramp = torch.linspace(0, 1, steps)
    return (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7 * (image_size / 64)


@pytest.mark.parametrize("image_size", [256, 512])
def test_official_time_input_equals_ours_bit_for_bit(image_size):
    """c = 1000 * 0.25 * ln(sigma~ + 1e-44) (official) vs 250 ln sigma~ (losses.c_noise): the epsilon is far below one
    ulp of every sigma~ used, in fp32 (official sampler) and fp64, on the sampler grids and the 1280-point grid."""
    s = image_size / 64
    grids = [_official_sampler_sigmas(n, image_size) for n in (1, 2, 32, 50, 1280)]
    grids += [g.double() for g in grids] + [losses.karras_sigmas(1280) * s, losses.karras_sigmas(32) * s]
    for sigma in grids:
        assert torch.equal(1000 * 0.25 * torch.log(sigma + 1e-44), losses.c_noise(sigma))


@pytest.mark.parametrize("image_size", [256, 512])
def test_guidance_interval_recovered_from_the_time_input_matches_the_sigma_test(image_size):
    """The official sampler decides guidance on exp(c / 250) - 1e-44 in (0.19 s, 1.61 s]; deciding on sigma~ itself
    (float64 grid) selects the same steps for every step count up to 128."""
    s = image_size / 64
    for steps in range(2, 129):
        c = 1000 * 0.25 * torch.log(_official_sampler_sigmas(steps, image_size) + 1e-44)
        official_choice = [0.19 * s < math.exp(v / 250) - 1e-44 <= 1.61 * s for v in c.tolist()]
        ours = [0.19 < v / s <= 1.61 for v in (losses.karras_sigmas(steps) * s).tolist()]
        assert official_choice == ours, steps


def test_official_sampling_defaults():
    import sample
    xl = dict(kind="epg", model="XL", image_size=256, num_classes=1000)
    stage, normalize, sampling = official.official_sampling(xl)
    assert (stage, normalize) == ("diffusion", "imagenet")
    assert sampling == dict(clamp="official", sampler="heun", steps=32, cfg_interval=(0.19, 1.61), cfg_scale=2.5)
    assert official.official_sampling(dict(xl, model="L", image_size=512))[2]["cfg_scale"] == 3.2
    assert "cfg_scale" not in official.official_sampling(dict(xl, model="XXL"))[2]     # not published
    stage, _, sampling = official.official_sampling(dict(xl, model="L"))
    assert (stage, sampling) == ("consistency", dict(clamp="official", sampler="consistency", steps=1))
    # config["sampling"] holds defaults for sample.py's arguments, by their names, with values its parser accepts
    for s in official.OFFICIAL_SAMPLING.values():
        argv = ["--ckpt", "x.pt", "--clamp", s["clamp"], "--sampler", s["sampler"], "--steps", str(s["steps"]),
                "--cfg-scale", "2.5", "--cfg-interval", *map(str, s.get("cfg_interval", (0.19, 1.61)))]
        args = vars(sample.parse_args(argv))
        assert all(args[k] == (list(v) if isinstance(v, tuple) else v) for k, v in s.items())
    # "imagenet" is the official std="imagenet" normalisation: ImageNet mean and twice the ImageNet std
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229 * 2, 0.224 * 2, 0.225 * 2]).view(3, 1, 1)
    torch.testing.assert_close(data.normalize(x, "imagenet"), (x - mean) / std)
