"""EPG networks: the ViT encoder, the RCM pre-training model and the EPG encoder-decoder of "There is No VAE:
End-to-End Pixel-Space Generative Modeling via Self-supervised Pre-training" (Lei et al., arXiv 2510.12586), Figure 2,
Figure 4, Tables 7 and 8.

    RCM (pre-training, Table 8)          EPG (fine-tuning, Table 7, Figure 4)
    ---------------------------          ------------------------------------
    [CLS] [time] [patches] + pos         [CLS + class] [time] [patches] + pos
    encoder blocks (pre-LN ViT)          encoder blocks  --- skip e_j ----------+
    LN -> CLS -> projector (3-layer MLP) LN -> (Linear if widths differ)        |
                                         decoder blocks: LN(Linear([x; e_j]))   <+  (mirrored, last->first)
                                                         adaLN-Zero attn + MLP  (conditioned on time + class)
                                         LN -> zero-init Linear -> unpatchify

The networks see the *preconditioned* input c_in(sigma) * x_t and the time condition c(t) = 250 ln(sigma)
(Table 9) of the *shifted* noise level; the preconditioning itself lives in losses.py.

`python models.py` prints parameter counts and forward GFLOPs of every configuration.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Configurations (Tables 7 and 8): encoder and decoder have the same depth; "T" is a tiny model for CPU ----
# The patch size is image_size // tokens_per_side: 16 at 256^2, 32 at 512^2 (the paper keeps 256 image tokens).
# pos_embed_init: trunc-normal(0.02) (official code), or MAE's 2-D sin-cos ("sincos", T only: from a near-zero start a
# few thousand CPU steps barely learn where a token is, and samples are mosaics of 4x4 patches; BENCHMARKS.md, "The
# tiny presets").
MODEL_CONFIGS = {
    "T":   dict(depth=4, enc_dim=128, enc_heads=4, dec_dim=128, dec_heads=4, tokens_per_side=8,
                proj_hidden=512, proj_dim=128, pos_embed_init="sincos"),
    "S":   dict(depth=6, enc_dim=768, enc_heads=12, dec_dim=768, dec_heads=12),
    "B":   dict(depth=12, enc_dim=768, enc_heads=12, dec_dim=768, dec_heads=12),
    "L":   dict(depth=16, enc_dim=1024, enc_heads=16, dec_dim=1024, dec_heads=16),
    "XL":  dict(depth=12, enc_dim=768, enc_heads=12, dec_dim=1584, dec_heads=22),
    "XXL": dict(depth=12, enc_dim=768, enc_heads=12, dec_dim=1920, dec_heads=16),
    "G":   dict(depth=12, enc_dim=768, enc_heads=12, dec_dim=2688, dec_heads=21),
}
# proj_dim: not stated in the paper; 256 reproduces Table 8's parameter counts
DEFAULTS = dict(tokens_per_side=16, mlp_ratio=4, proj_hidden=4096, proj_dim=256, pos_embed_init="trunc-normal")


def model_config(name):
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODEL_CONFIGS)}")
    return {**DEFAULTS, **MODEL_CONFIGS[name]}


def patch_size_for(name, image_size):
    tokens = model_config(name)["tokens_per_side"]
    if image_size % tokens:
        raise ValueError(f"image size {image_size} is not divisible by {tokens} (model {name} uses "
                         f"{tokens}x{tokens} patches of size image_size/{tokens}); pick a multiple of {tokens}")
    return image_size // tokens


# ---- Building blocks ----
def timestep_embedding(c_noise, dim, max_period=10000.0):
    """Sinusoidal embedding (ADM style, cos half first) of c(t) = 250 ln(t~) (B,) (Table 9) -> (B, dim) float32, used
    as-is (no MLP) as the time token and in the decoder's adaLN condition."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
    args = c_noise.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))    # odd dim: last column 0


def sincos_pos_embed_2d(grid, dim):
    """MAE / MoCo v3's 2-D sin-cos embedding of a row-major grid x grid layout -> (grid*grid, dim) float32: the first
    dim/2 channels encode the row, the last the column, as [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))      # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)                                 # (grid*grid,)
    encode = lambda p: torch.cat([torch.sin(p[:, None] * omega), torch.cos(p[:, None] * omega)], dim=1)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are computed in fp32 (also under bf16 autocast), output in the input dtype."""

    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, output projection with bias, then `proj_drop` (Table 11: 0.5 in
    the consistency decoder)."""

    def __init__(self, dim, heads, proj_drop=0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)          # (B, heads, T, head_dim); flash kernel on GPU
        x = x.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-LN ViT block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Long skip from the mirrored encoder block, then an adaLN-Zero transformer block (Figure 4):
    skip merge:  x <- LN(Linear([x ; e]))            (concat on channels, D_dec + D_enc -> D_dec)
    adaLN-Zero:  (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c)), zero-initialised
                 x += gate1 * Attn(LN(x) * (1 + scale1) + shift1)
                 x += gate2 * MLP(LN(x) * (1 + scale2) + shift2)"""

    def __init__(self, dim, heads, enc_dim, cond_dim, mlp_ratio=4, attn_drop=0.0):
        super().__init__()
        self.skip_linear = nn.Linear(dim + enc_dim, dim)
        self.skip_norm = LayerNorm(dim)
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, proj_drop=attn_drop)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x, skip, c):
        x = self.skip_norm(self.skip_linear(torch.cat([x, skip], dim=-1)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


# ---- Encoder (shared by RCM and EPG) ----
class Encoder(nn.Module):
    """ViT encoder over [CLS] [time] [patch_1 .. patch_N] with a learnable positional embedding on all tokens."""

    def __init__(self, image_size, patch_size, dim, depth, heads, mlp_ratio=4, pos_embed_init="trunc-normal"):
        super().__init__()
        if pos_embed_init not in ("trunc-normal", "sincos"):
            raise ValueError(f"unknown pos_embed_init {pos_embed_init!r}: choose 'trunc-normal' or 'sincos'")
        self.patch_size, self.dim, self.pos_embed_init = patch_size, dim, pos_embed_init
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 + self.num_patches, dim))
        self.blocks = nn.ModuleList([EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm(dim)

    def forward(self, x, c_noise, cls_offset=None):
        """x: (B, 3, H, W) preconditioned, c_noise: (B,), cls_offset: (B, D) added to [CLS] or None. -> (tokens
        (B, 2+N, D) after the final LN, skips: each block's raw residual stream, for the decoder's long skips)."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)                       # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if cls_offset is not None:
            cls = cls + cls_offset[:, None].to(cls.dtype)
        time = timestep_embedding(c_noise, self.dim)[:, None].to(patches.dtype)        # (B, 1, D)
        h = torch.cat([cls.to(patches.dtype), time, patches], dim=1) + self.pos_embed.to(patches.dtype)
        skips = []
        for block in self.blocks:
            h = block(h)
            skips.append(h)
        return self.norm(h), skips


def init_vit_weights(module, qkv_per_slice=True):
    """Initialisation of the official code: xavier-uniform Linear (for the RCM the fused qkv per q/k/v slice, as in
    MoCo v3; for the EPG one xavier over the fused (3D, D) matrix, as the official EPGViT), zero biases, xavier conv
    over the flattened kernel, CLS ~ N(0, 1e-6^2), positional embedding ~ trunc-normal(0.02) (or, for an encoder built
    with pos_embed_init="sincos", the 2-D sin-cos embedding on the image tokens and 0 on [CLS], [time])."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("qkv") and qkv_per_slice:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
        elif isinstance(m, Encoder):
            nn.init.normal_(m.cls_token, std=1e-6)
            if m.pos_embed_init == "sincos":
                with torch.no_grad():
                    m.pos_embed.zero_()
                    m.pos_embed[0, 2:] = sincos_pos_embed_2d(math.isqrt(m.num_patches), m.dim)
            else:
                nn.init.trunc_normal_(m.pos_embed, std=0.02)


# ---- RCM: encoder + projector (pre-training, Table 8) ----
class RCM(nn.Module):
    """Representation Consistency Model (Figure 2a, Table 8): the encoder plus a projector Linear(D->4096) BN ReLU,
    Linear(4096->4096) BN ReLU, Linear(4096->256), all without bias; no BN after the last layer, no predictor."""

    def __init__(self, image_size=256, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4,
                 proj_hidden=4096, proj_dim=256, pos_embed_init="trunc-normal"):
        super().__init__()
        self.encoder = Encoder(image_size, patch_size, dim, depth, heads, mlp_ratio, pos_embed_init)
        self.projector = nn.Sequential(
            nn.Linear(dim, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_hidden, bias=False), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim, bias=False))
        init_vit_weights(self)

    def features(self, x, c_noise):
        """-> LN'd CLS feature (B, D): the representation-consistency feature (eq. 8)."""
        tokens, _ = self.encoder(x, c_noise)
        return tokens[:, 0]

    def forward(self, x, c_noise):
        """-> (projection (B, proj_dim) for the contrastive loss, CLS feature (B, D))."""
        h = self.features(x, c_noise)
        return self.projector(h), h


class RCMViews(nn.Module):
    """An RCM pass as eq. 8 needs it, on [y1~; y2~] or, with `with_rest`, [y1~; y2~; x_n] (chunks of equal size):
    the projections of the two views, each through the projector on its own (per-view BatchNorm statistics, as in
    MoCo v3), and the LN'd CLS feature of x_n. One encoder pass; one module, so that DDP sees one forward per
    backward. -> (q1, q2) or (q1, q2, h_n)"""

    def __init__(self, rcm, with_rest=False):
        super().__init__()
        self.rcm, self.with_rest = rcm, with_rest

    def forward(self, x, c_noise):
        h = self.rcm.features(x, c_noise).chunk(3 if self.with_rest else 2)
        return (self.rcm.projector(h[0]), self.rcm.projector(h[1]), *h[2:])


# ---- EPG: encoder + decoder (fine-tuning, Table 7, Figure 4) ----
class EPG(nn.Module):
    """The EPG generator F(c_in x, c(t), y): pre-trained encoder + adaLN-Zero decoder with encoder->decoder skips.
    Labels in [0, num_classes], `num_classes` the null class of CFG; decoder_dropout: after each attention block."""

    def __init__(self, image_size=256, patch_size=16, depth=12, enc_dim=768, enc_heads=12, dec_dim=768,
                 dec_heads=12, num_classes=1000, mlp_ratio=4, decoder_dropout=0.0, pos_embed_init="trunc-normal"):
        super().__init__()
        self.image_size, self.patch_size, self.num_classes = image_size, patch_size, num_classes
        self.encoder = Encoder(image_size, patch_size, enc_dim, depth, enc_heads, mlp_ratio, pos_embed_init)
        self.class_embed = nn.Embedding(num_classes + 1, enc_dim)      # last row: null class
        self.enc_to_dec = nn.Linear(enc_dim, dec_dim) if dec_dim != enc_dim else nn.Identity()
        self.dec_blocks = nn.ModuleList([
            DecoderBlock(dec_dim, dec_heads, enc_dim, enc_dim, mlp_ratio, decoder_dropout) for _ in range(depth)])
        self.out_norm = LayerNorm(dec_dim)
        self.out = nn.Linear(dec_dim, patch_size * patch_size * 3)
        init_vit_weights(self, qkv_per_slice=False)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.dec_blocks] + [self.out]:
            nn.init.zeros_(layer.weight)            # adaLN-Zero: every gate starts at 0; the output starts at exactly 0
            nn.init.zeros_(layer.bias)

    def forward(self, x, c_noise, y):
        """-> the raw output F (B, 3, H, W): the clean image for diffusion (x-prediction), F_theta of eq. 4."""
        class_emb = self.class_embed(y)                                          # (B, D_enc)
        tokens, skips = self.encoder(x, c_noise, cls_offset=class_emb)
        cond = timestep_embedding(c_noise, class_emb.shape[-1]) + class_emb      # time + class (adaLN condition)
        h = self.enc_to_dec(tokens)
        for block, skip in zip(self.dec_blocks, reversed(skips)):               # last encoder block -> first decoder
            h = block(h, skip, cond.to(h.dtype))
        h = self.out(self.out_norm(h[:, 2:]))                                    # image tokens: (B, N, p*p*3)
        return unpatchify(h, self.patch_size)


def unpatchify(tokens, patch_size):
    """(B, m*n, p*p*3) with per-token layout (p1, p2, c) -> (B, 3, m*p, n*p)."""
    B, N, _ = tokens.shape
    m = int(math.isqrt(N))
    x = tokens.view(B, m, m, patch_size, patch_size, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, m * patch_size, m * patch_size)


# ---- Factories ----
def build_rcm(name, image_size=256, proj_dim=None):
    """RCM-`name` (Table 8); proj_dim overrides the projector output."""
    cfg = model_config(name)
    return RCM(image_size, patch_size_for(name, image_size), cfg["enc_dim"], cfg["depth"], cfg["enc_heads"],
               cfg["mlp_ratio"], cfg["proj_hidden"], proj_dim or cfg["proj_dim"], cfg["pos_embed_init"])


def build_epg(name, image_size=256, num_classes=1000, decoder_dropout=0.0):
    """EPG-`name` (Table 7) at `image_size` for `num_classes` classes (plus the null class)."""
    cfg = model_config(name)
    return EPG(image_size, patch_size_for(name, image_size), cfg["depth"], cfg["enc_dim"], cfg["enc_heads"],
               cfg["dec_dim"], cfg["dec_heads"], num_classes, cfg["mlp_ratio"], decoder_dropout, cfg["pos_embed_init"])


def load_encoder_from_rcm(epg, rcm_state):
    """`epg`'s encoder from an RCM state dict (§3.3: the projector is discarded, the rest stays fresh); exactly the
    encoder tensors must transfer, else ValueError. -> the transferred keys."""
    encoder_keys = {k for k in epg.state_dict() if k.startswith("encoder.")}
    available = {k for k in rcm_state if k.startswith("encoder.")}
    missing = sorted(encoder_keys - available)
    unexpected = sorted(k for k in rcm_state if not (k.startswith("encoder.") or k.startswith("projector.")))
    if missing or unexpected or available - encoder_keys:
        raise ValueError(f"the RCM checkpoint does not match this model's encoder: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3] or sorted(available - encoder_keys)[:3]}")
    own = epg.state_dict()
    wrong = [f"{k} {tuple(rcm_state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(encoder_keys)
             if rcm_state[k].shape != own[k].shape]
    if wrong:
        raise ValueError("the RCM checkpoint is for another model size or image size: " + "; ".join(wrong[:3]))
    epg.load_state_dict({k: rcm_state[k] for k in encoder_keys}, strict=False)
    return sorted(encoder_keys)


# ---- Counting: parameters and forward multiply-accumulates ----
def count_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model, image_size):
    """Forward multiply-accumulates of one image, by hooks: `linear` of every Linear and Conv2d (the paper's GFLOPs,
    DiT's convention, Tables 1/2 within 1%), `attention` of QK^T and AV (2 T^2 D per layer); FLOPs are twice these."""
    macs = {"linear": 0, "attention": 0}

    def linear_hook(m, inputs, output):             # Linear, Conv2d: each output value costs one weight row
        macs["linear"] += output.numel() * m.weight[0].numel()

    def attention_hook(m, inputs, output):
        B, T, D = inputs[0].shape
        macs["attention"] += 2 * B * T * T * D

    hooks = {nn.Linear: linear_hook, nn.Conv2d: linear_hook, Attention: attention_hook}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks]
    device = next(model.parameters()).device           # the meta device for large models: no memory, no compute
    x, c_noise = torch.zeros(1, 3, image_size, image_size, device=device), torch.zeros(1, device=device)
    try:
        was_training = model.training
        model.eval()
        if isinstance(model, EPG):
            model(x, c_noise, torch.zeros(1, dtype=torch.long, device=device))
        else:
            model.features(x, c_noise)      # the projector acts on one vector per image: negligible, not counted
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return macs


# (row name, kind, model name, image size) of the paper's configurations
PAPER_MODELS = [
    ("EPG-S/16", "epg", "S", 256), ("EPG-B/16", "epg", "B", 256), ("EPG-L/16", "epg", "L", 256),
    ("EPG-XL/16", "epg", "XL", 256), ("EPG-XXL/16", "epg", "XXL", 256), ("EPG-G/16", "epg", "G", 256),
    ("EPG-L/32", "epg", "L", 512), ("RCM-S/16", "rcm", "S", 256), ("RCM-B/16", "rcm", "B", 256),
    ("RCM-L/16", "rcm", "L", 256), ("T (EPG-T/4 @32)", "epg", "T", 32),
]


def build_on_meta(kind, name, image_size, num_classes=1000):
    with torch.device("meta"):                      # no memory allocated: for counting the large models
        return build_epg(name, image_size, num_classes) if kind == "epg" else build_rcm(name, image_size)


def forward_flops(kind, name, image_size):
    """Hardware FLOPs of one forward pass of one image of an "epg" or "rcm" (Linear/Conv and attention matmuls)."""
    macs = count_macs(build_on_meta(kind, name, image_size), image_size)
    return 2 * (macs["linear"] + macs["attention"])


# forward-pass equivalents per image and training step (a backward costs two forwards): pre-training 3 trained passes
# (two views, the noisier level) and 3 without gradient (momentum views, the sg target); diffusion one trained pass;
# consistency one trained pass, the sg target, and W of eq. 9 (its keys, and the prediction's features with gradient)
TRAIN_PASSES = {"pretrain": {"rcm": 12}, "diffusion": {"epg": 3}, "consistency": {"epg": 4, "rcm": 3}}


def train_flops_per_image(stage, name, image_size):
    return sum(n * forward_flops(kind, name, image_size) for kind, n in TRAIN_PASSES[stage].items())


def main():
    print(f"{'name':<18} | {'params (M)':>10} | {'forward GFLOPs per image':>24}")
    print("-" * 60)
    for row, kind, name, size in PAPER_MODELS:
        model = build_on_meta(kind, name, size)
        macs = count_macs(model, size)
        print(f"{row:<18} | {count_params(model) / 1e6:>10.2f} | {macs['linear'] / 1e9:>24.2f}")
    print("\nParams include the 1001-row class table (1000 ImageNet classes + the null class) and, for RCM, the "
          "projector\n(4096-4096-256). GFLOPs are multiply-accumulates of Linear and Conv layers over all 258 tokens "
          "(DiT's\nconvention, used by the paper); the attention matmuls QK^T and AV add 2*T^2*D per layer (~3%).")


if __name__ == "__main__":
    main()
