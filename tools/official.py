"""Convert the authors' released checkpoints (RCM encoders, EPG generators) into checkpoints of this project.

    python tools/official.py convert SRC OUT.pt [--weights ema|online]

The official code (`rcm/vit.py`: `RCMViT` for pre-training, `EPGViT` for fine-tuning; `DMViT` in the first,
inference-only release has the same parameter names) saves folders of plain PyTorch state dicts:

    nnet.pth          online weights        (what the official fine-tuning reads from an RCM folder: --init)
    nnet_ema.pth      EMA weights           (what the official sampler reads: --ckpt)
    target_model.pth  pre-training momentum encoder (never picked automatically; pass the file to use it)

SRC is such a folder or one .pth file. In a folder, --weights picks the file: by default nnet_ema.pth for an EPG and
nnet.pth for an RCM, as the official scripts do (the other file if that one is absent). OUT.pt (never overwritten;
written atomically) is read like a checkpoint of our own scripts (--init of the fine-tuning scripts, sample.py --ckpt):

    RCM  {"stage": "pretrain", "step": 0, "model": RCM state dict,
          "config": {"model", "image_size", "patch_size", "proj_dim", "normalize": "imagenet", "converted_from"}}
    EPG  {"stage": "diffusion" | "consistency", "step": 0, "model": EPG state dict, "ema": the same tensors,
          "config": {"model", "image_size", "patch_size", "num_classes", "normalize", "converted_from",
                     "sampling": how the official sampler ran it, keyed by sample.py's arguments}}

converted_from is the file read. An EPG's "model" and "ema" hold the one set of weights --weights chose (stored once);
its normalize is "imagenet", "simple" for the unconditional consistency release (see OFFICIAL_SAMPLING).
An RCM saved without its projector converts to the encoder alone (proj_dim None): enough for --init.

Model size. Depths come from the block counts, widths from the tensor shapes, the patch size from the patch-embedding
kernel, the image size from the positional-embedding length (2 extra tokens + (image/patch)^2 patches). The head counts
are not stored in a state dict: they come from the matching entry of models.MODEL_CONFIGS (Tables 7 and 8; identical to
the official configs), and a checkpoint that matches no entry is refused.

Every conversion is a renaming (NAME_TABLE below): no tensor needs reordering, as argued next to the table.
"""
import argparse
import contextlib
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import models  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Official parameter names -> ours (`{i}` a block or layer index, `{p}` a parameter or buffer name), read from the
# public official `rcm/vit.py`. Every conversion is a renaming:
#
# * qkv rows: the official attention splits the qkv output as (3, heads, head_dim) ('B L (K H D)'); ours views it as
#   (3, heads, head_dim) too -> rows unchanged.
# * output rows: the official unpatchify reads each token as (p1, p2, c) with c fastest; so does models.unpatchify
#   -> rows of `out` unchanged. Patch embedding: the same Conv2d, tokens in the same raster order.
# * adaLN chunks (shift, scale, gate) x (attention, MLP) and the skip concat [decoder stream ; encoder skip] are in
#   the same order; every LayerNorm has eps 1e-5 and an affine; the MLP is fc1 -> exact GELU -> fc2 (our Sequential
#   indices 0 and 2).
# * time_embed is nn.Identity and the pre-training projector's ReLUs have no tensors: nothing to map.
# ----------------------------------------------------------------------------------------------------------------
NAME_TABLE = [
    # shared ViT encoder (RCMViT and EPGViT)
    ("patch_embed.proj.{p}", "encoder.patch_embed.{p}"),
    ("cls_token", "encoder.cls_token"),
    ("pos_embed", "encoder.pos_embed"),
    ("blocks.{i}.norm1.{p}", "encoder.blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.blocks.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.blocks.{i}.mlp.0.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.blocks.{i}.mlp.2.{p}"),
    ("norm.{p}", "encoder.norm.{p}"),
    # RCMViT only: the 3-layer projector (Linear 0, BN 1, ReLU 2, Linear 3, BN 4, ReLU 5, Linear 6), same indices
    ("projection_head.{i}.{p}", "projector.{i}.{p}"),
    # EPGViT only: class table, width bridge, decoder, head
    ("class_embed.weight", "class_embed.weight"),
    ("encoder_to_decoder.{p}", "enc_to_dec.{p}"),
    ("decoder_blocks.{i}.skip_linear.{p}", "dec_blocks.{i}.skip_linear.{p}"),
    ("decoder_blocks.{i}.skip_norm.{p}", "dec_blocks.{i}.skip_norm.{p}"),
    ("decoder_blocks.{i}.norm1.{p}", "dec_blocks.{i}.norm1.{p}"),
    ("decoder_blocks.{i}.attn.qkv.{p}", "dec_blocks.{i}.attn.qkv.{p}"),
    ("decoder_blocks.{i}.attn.proj.{p}", "dec_blocks.{i}.attn.proj.{p}"),
    ("decoder_blocks.{i}.norm2.{p}", "dec_blocks.{i}.norm2.{p}"),
    ("decoder_blocks.{i}.mlp.fc1.{p}", "dec_blocks.{i}.mlp.0.{p}"),
    ("decoder_blocks.{i}.mlp.fc2.{p}", "dec_blocks.{i}.mlp.2.{p}"),
    ("decoder_blocks.{i}.adaLN_modulation.1.{p}", "dec_blocks.{i}.adaLN_modulation.1.{p}"),
    ("out_norm.{p}", "out_norm.{p}"),
    ("out.{p}", "out.{p}"),
]

# ----------------------------------------------------------------------------------------------------------------
# How the official sampler runs a released generator (official `sample.py`, `rcm/rcm_denoiser.py`, configs), written
# into config["normalize"] and config["sampling"] so that the released FIDs can be reproduced:
#   normalize  "imagenet": data = (x - mean_IN) / (2 std_IN) (data.normalize mode), std="imagenet" in every
#              released diffusion config; the unconditional consistency checkpoint (no class table, first-release
#              config without `std`) used "simple" = 2x - 1.
#   clamp      "official": the denoiser output is clamped to [-1, 1] in normalised space (narrower than the imagenet
#              data range, so highlights are capped; our default clamps to data.data_range instead).
#   null_class the unconditional label is index num_classes (1000 for ImageNet), the last class-table row: the same
#              convention as models.EPG, so no relabelling.
#   c_noise    official 1000 * 0.25 * ln(sigma~ + 1e-44) with sigma~ = s * sigma: our losses.c_noise is 250 ln sigma~;
#              the 1e-44 is far below one ulp of the smallest sigma~ used (s * 0.002 = 0.008 at 256^2) in fp32
#              and fp64, so both give bit-identical time inputs (tests/test_official.py checks this): no change.
#   sampler    fp32, EMA weights, Heun over 32 shifted Karras points without a final sigma = 0, interval CFG on
#              (0.19 s, 1.61 s]; the consistency model samples in one step from s * 80.
# ----------------------------------------------------------------------------------------------------------------
OFFICIAL_SAMPLING = {
    "diffusion": dict(clamp="official", sampler="heun", steps=32, cfg_interval=(0.19, 1.61)),
    "consistency": dict(clamp="official", sampler="consistency", steps=1),
}

# (model, image size) of each released generator -> (stage, guidance scale of the official sampling script or None)
RELEASED_GENERATORS = {
    ("XL", 256): ("diffusion", 2.5),      # EPG-XL/16, scripts/sample_dm_in256.sh
    ("XXL", 256): ("diffusion", None),    # EPG-XXL/16, scale not published
    ("G", 256): ("diffusion", None),      # EPG-G/16, scale not published
    ("L", 512): ("diffusion", 3.2),       # EPG-L/32, scripts/sample_dm_in512.sh
    ("L", 256): ("consistency", None),    # EPG-L/16 one-step consistency model
}

CHECKPOINT_FILES = {"ema": ("nnet_ema.pth", "nnet.pth"), "online": ("nnet.pth", "nnet_ema.pth")}


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be read or does not match our models (one-line message)."""


# ----------------------------------------------------------------------------------------------------------------
# Recognising and sizing an official state dict
# ----------------------------------------------------------------------------------------------------------------
def _template_regex(template):
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[A-Za-z_]+)")
    return re.compile(pattern)


_FORWARD = [(_template_regex(official), ours) for official, ours in NAME_TABLE]
_BACKWARD = [(_template_regex(ours), official) for official, ours in NAME_TABLE]


def _rename(name, rules):
    for regex, template in rules:
        match = regex.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def official_to_ours(name):
    """Our parameter name for official parameter `name`, or None if the name is not in NAME_TABLE."""
    return _rename(name, _FORWARD)


def ours_to_official(name):
    """The official name of our parameter `name` (inverse of official_to_ours)."""
    return _rename(name, _BACKWARD)


def _strip_module_prefix(sd):
    """State dicts saved from a DistributedDataParallel wrapper carry 'module.' on every key; drop it."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def is_official_state_dict(sd):
    """True if `sd` has the official key layout (top-level patch_embed.proj / pos_embed / cls_token of RCMViT or
    EPGViT); False for our own state dicts (keys under encoder.) and our checkpoint files ("stage", "config", ...)."""
    if not isinstance(sd, dict):
        return False
    sd = _strip_module_prefix(sd)
    return all(isinstance(sd.get(k), torch.Tensor) for k in ("patch_embed.proj.weight", "pos_embed", "cls_token"))


def _block_count(sd, prefix):
    indices = {int(k[len(prefix):].split(".")[0]) for k in sd if re.match(re.escape(prefix) + r"\d+\.", k)}
    return max(indices) + 1 if indices else 0


def _shape(sd, key):
    if key not in sd:
        raise OfficialCheckpointError(f"official checkpoint lacks the tensor '{key}', so its model size cannot be "
                                      f"inferred; it is incomplete or from another architecture")
    return tuple(sd[key].shape)


def infer_official_config(sd):
    """Model size of an official state dict, from its tensor shapes.

    Returns dict(kind "rcm" | "epg", model (a models.MODEL_CONFIGS name), image_size, patch_size,
    num_classes (EPG: rows of the class table - 1, i.e. the null index; 0 for an unconditional model without a class
    table; None for RCM), proj_dim (RCM projector output; None for EPG, or for an RCM saved without projector),
    depth, enc_dim, dec_dim).
    Raises OfficialCheckpointError if `sd` is not official or matches none of our configurations.
    """
    if not is_official_state_dict(sd):
        raise OfficialCheckpointError("not an official EPG/RCM state dict (no top-level patch_embed.proj.weight, "
                                      "pos_embed and cls_token)")
    sd = _strip_module_prefix(sd)
    patch_shape = _shape(sd, "patch_embed.proj.weight")                   # (D_enc, 3, p, p)
    if len(patch_shape) != 4 or patch_shape[1] != 3 or patch_shape[2] != patch_shape[3]:
        raise OfficialCheckpointError(f"official patch embedding has shape {patch_shape}; expected (D, 3, p, p)")
    enc_dim, patch_size = patch_shape[0], patch_shape[2]
    cls_shape, pos_shape = _shape(sd, "cls_token"), _shape(sd, "pos_embed")  # (1, 1, D), (1, 2 + N, D)
    if len(cls_shape) != 3 or cls_shape[1] != 1:
        raise OfficialCheckpointError(f"official cls_token has shape {cls_shape}: our models have exactly one [CLS] "
                                      f"token (official tokens=1)")
    num_patches = pos_shape[1] - 2
    grid = math.isqrt(max(num_patches, 0))
    if len(pos_shape) != 3 or grid * grid != num_patches or grid == 0:
        raise OfficialCheckpointError(f"official pos_embed has shape {pos_shape}: expected (1, 2 + m*m, D)")
    image_size = grid * patch_size
    depth = _block_count(sd, "blocks.")
    kind = "epg" if _block_count(sd, "decoder_blocks.") else "rcm"

    config = dict(kind=kind, image_size=image_size, patch_size=patch_size, depth=depth, enc_dim=enc_dim)
    if kind == "epg":
        dec_depth = _block_count(sd, "decoder_blocks.")
        dec_dim = _shape(sd, "out_norm.weight")[0]
        num_classes = _shape(sd, "class_embed.weight")[0] - 1 if "class_embed.weight" in sd else 0
        config.update(num_classes=num_classes, proj_dim=None, dec_dim=dec_dim)
        names = [n for n, c in ((n, models.model_config(n)) for n in models.MODEL_CONFIGS)
                 if (c["depth"], c["enc_dim"], c["dec_dim"], c["tokens_per_side"]) == (depth, enc_dim, dec_dim, grid)
                 and dec_depth == depth]
        described = (f"EPG with encoder {depth}x{enc_dim}, decoder {dec_depth}x{dec_dim}, patch {patch_size} at "
                     f"{image_size}px")
    else:
        last = _block_count(sd, "projection_head.") - 1
        config.update(num_classes=None, dec_dim=enc_dim,
                      proj_dim=_shape(sd, f"projection_head.{last}.weight")[0] if last >= 0 else None)
        # an RCM is named after the model whose decoder mirrors its encoder (RCM-B, not RCM-XL)
        names = [n for n, c in ((n, models.model_config(n)) for n in models.MODEL_CONFIGS)
                 if (c["depth"], c["enc_dim"], c["tokens_per_side"]) == (depth, enc_dim, grid)
                 and (c["dec_dim"], c["dec_heads"]) == (c["enc_dim"], c["enc_heads"])]
        described = f"RCM with encoder {depth}x{enc_dim}, patch {patch_size} at {image_size}px"
    if not names:
        raise OfficialCheckpointError(f"official checkpoint ({described}) matches none of our model configurations "
                                      f"({', '.join(models.MODEL_CONFIGS)}); add it to models.MODEL_CONFIGS with "
                                      f"its head counts")
    config["model"] = names[0]
    return config


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------
def build_model(config):
    """Our model for an inferred official `config`: models.build_epg / build_rcm (random init; load the converted
    state dict into it). An RCM saved without projector converts to its encoder only: use it with
    models.load_encoder_from_rcm (fine-tuning --init) rather than with this RCM."""
    if config["kind"] == "epg":
        return models.build_epg(config["model"], config["image_size"], config["num_classes"])
    return models.build_rcm(config["model"], config["image_size"], config["proj_dim"])


def _short_list(items, limit=6):
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... (+{len(items) - limit} more)' if len(items) > limit else ''}]"


def convert_state_dict(sd):
    """Official RCMViT / EPGViT (or DMViT) state dict -> (infer_official_config(sd), our state dict, which loads with
    strict=True into build_model(config)). Every official tensor is used exactly once and every one of ours is
    filled, else OfficialCheckpointError lists the missing, unexpected and wrong-shaped tensors (official names)."""
    sd = _strip_module_prefix(sd) if isinstance(sd, dict) else sd
    config = infer_official_config(sd)
    kind = config["kind"]
    with torch.device("meta"):                                             # shapes only, no memory
        target = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    if kind == "rcm" and config["proj_dim"] is None:                      # saved without projector: encoder only
        target = {k: v for k, v in target.items() if k.startswith("encoder.")}
    if kind == "epg" and config["num_classes"] == 0:
        # Unconditional official model (no class table; the official forward then adds no class embedding): our EPG
        # with num_classes = 0 has one class row, the null class 0, filled with zeros -> identical computation.
        del target["class_embed.weight"]

    converted, matched, unexpected, wrong_shape = {}, set(), [], []
    for name, tensor in sd.items():
        ours = official_to_ours(name)
        if ours is None or ours not in target or ours in matched:
            unexpected.append(name)
            continue
        matched.add(ours)
        if tuple(tensor.shape) != target[ours]:
            wrong_shape.append(f"{name} {tuple(tensor.shape)} vs {target[ours]}")
        else:
            converted[ours] = tensor
    missing = [ours_to_official(k) for k in target if k not in matched]
    if missing or unexpected or wrong_shape:
        what = kind.upper()
        problems = [f"{len(l)} {label} {_short_list(l)}" for label, l in
                    (("missing", missing), ("unexpected", unexpected), ("wrong-shaped (got vs expected)", wrong_shape))
                    if l]
        raise OfficialCheckpointError(f"official {what} checkpoint does not match our {what}-{config['model']} at "
                                      f"{config['image_size']}px: " + "; ".join(problems))
    if kind == "epg" and config["num_classes"] == 0:
        converted["class_embed.weight"] = torch.zeros(1, config["enc_dim"], dtype=sd["pos_embed"].dtype)
    return config, converted


# ----------------------------------------------------------------------------------------------------------------
# Files, folders and our checkpoint
# ----------------------------------------------------------------------------------------------------------------
def _checkpoint_file(path, weights):
    if os.path.isdir(path):
        for name in CHECKPOINT_FILES[weights]:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise OfficialCheckpointError(f"folder '{path}' holds neither nnet_ema.pth nor nnet.pth (the official "
                                      f"checkpoint files); pass the folder of a released checkpoint or a .pth file")
    if os.path.isfile(path):
        return path
    raise OfficialCheckpointError(f"checkpoint '{path}' does not exist")


def _read_state_dict(file):
    """torch.load of a plain state dict, tensors only (weights_only), memory-mapped where the format allows."""
    for mmap in (True, False):
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
            error = e
    else:
        raise OfficialCheckpointError(f"'{file}' is unreadable or corrupt ({type(error).__name__}); use another "
                                      f"checkpoint") from None
    if not is_official_state_dict(sd):
        raise OfficialCheckpointError(f"'{file}' is not an official EPG/RCM state dict (no top-level "
                                      f"patch_embed.proj.weight, pos_embed and cls_token)")
    return _strip_module_prefix(sd)


def official_sampling(config):
    """(stage, normalize, sampling) of the official sampler for the EPG described by `config` (see OFFICIAL_SAMPLING).
    The stage and guidance scale are looked up among the released generators (the weights alone do not say whether a
    model is a diffusion or a consistency model); cfg_scale is left out where the official scale is unknown or
    unused (unconditional model)."""
    stage, cfg_scale = RELEASED_GENERATORS.get((config["model"], config["image_size"]), ("diffusion", None))
    conditional = config["num_classes"] > 0
    sampling = dict(OFFICIAL_SAMPLING[stage])
    if cfg_scale is not None and conditional:
        sampling["cfg_scale"] = cfg_scale
    return stage, "imagenet" if conditional else "simple", sampling


def official_checkpoint(path, weights=None):
    """One of our checkpoints (the dict described in the module docstring) from a released folder or .pth file.
    weights: "ema" | "online" | None (the official scripts' choice: EMA for an EPG, online for an RCM)."""
    if weights not in (None, *CHECKPOINT_FILES):
        raise OfficialCheckpointError(f"unknown weights {weights!r}; choose one of {', '.join(CHECKPOINT_FILES)}")
    file = _checkpoint_file(path, weights or "ema")
    config, state = convert_state_dict(_read_state_dict(file))
    if weights is None and config["kind"] == "rcm" and _checkpoint_file(path, "online") != file:
        file = _checkpoint_file(path, "online")
        config, state = convert_state_dict(_read_state_dict(file))
    ours = {"model": config["model"], "image_size": config["image_size"], "patch_size": config["patch_size"],
            "converted_from": file}
    if config["kind"] == "rcm":
        ours.update(proj_dim=config["proj_dim"], normalize="imagenet")
        return {"stage": "pretrain", "config": ours, "step": 0, "model": state}
    stage, normalize, sampling = official_sampling(config)
    ours.update(num_classes=config["num_classes"], normalize=normalize, sampling=sampling)
    return {"stage": stage, "config": ours, "step": 0, "model": state, "ema": state}


def convert(src, out, weights=None):
    """Write official_checkpoint(src, weights) to `out` atomically (a temporary file in the same folder, then a
    rename: a kill leaves no half-written `out`). An existing `out` is never overwritten. Returns the checkpoint."""
    if os.path.exists(out):
        raise OfficialCheckpointError(f"'{out}' already exists; remove it or choose another output file")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise OfficialCheckpointError(f"output folder '{folder}' does not exist")
    checkpoint = official_checkpoint(src, weights)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OfficialCheckpointError(f"could not write '{out}' ({e.strerror}); free disk space or choose another "
                                      f"output file") from None
    return checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert the authors' released EPG / RCM checkpoints into checkpoints of this project.",
        epilog="examples:\n"
               "  python tools/official.py convert EPG-XL-256/ epg_xl.pt     # then: sample.py --ckpt epg_xl.pt\n"
               "  python tools/official.py convert RCM-B-256/ rcm_b.pt       # then: train_diffusion.py --init rcm_b.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="convert")
    command = commands.add_parser("convert", help="write one of our checkpoints from a released folder or .pth file")
    command.add_argument("src", metavar="SRC", help="a released folder (nnet_ema.pth / nnet.pth) or one .pth file")
    command.add_argument("out", metavar="OUT.pt", help="the checkpoint to write (must not exist)")
    command.add_argument("--weights", choices=tuple(CHECKPOINT_FILES), default=None,
                         help="in a folder: nnet_ema.pth (ema) or nnet.pth (online); default: ema for an EPG, "
                              "online for an RCM, as the official scripts")
    args = parser.parse_args(argv)
    try:
        checkpoint = convert(args.src, args.out, args.weights)
    except OfficialCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cfg = checkpoint["config"]
    kind = "RCM" if checkpoint["stage"] == "pretrain" else "EPG"
    sampling = ", ".join(f"{k} {v}" for k, v in cfg.get("sampling", {}).items())
    print(f"wrote {args.out}: {kind}-{cfg['model']}/{cfg['patch_size']} at {cfg['image_size']}px, stage "
          f"{checkpoint['stage']}, normalize {cfg['normalize']}, from {cfg['converted_from']}"
          + (f"; sampling defaults: {sampling}" if sampling else ""))


if __name__ == "__main__":
    main()
