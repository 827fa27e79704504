"""Convert the authors' released checkpoints (RCM encoders, EPG generators) into checkpoints of this project.

    python tools/official.py convert SRC OUT.pt [--weights ema|online]

SRC is a released folder (nnet.pth: online weights, nnet_ema.pth: EMA weights) or one .pth file (e.g. a momentum
encoder's target_model.pth). By default a folder gives the EMA weights of an EPG and the online ones of an RCM, as the
official scripts use them. OUT.pt (never overwritten, written atomically) loads like our checkpoints (fine-tuning
--init, sample.py --ckpt); its config records the official sampler's settings ("sampling", sample.py's arguments).
The size comes from the tensor shapes, the head counts from the matching models.MODEL_CONFIGS entry.
"""
import argparse
import contextlib
import math
import os
import re
import sys
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import models  # noqa: E402

# Official parameter names -> ours ({i} a block or layer index, {p} a parameter or buffer name); no tensor is
# reordered (qkv rows split as (3, heads, head_dim), tokens unpatchified as (p1, p2, c), adaLN chunks and the skip
# concat [decoder ; encoder skip] in the same order, LayerNorm eps 1e-5, MLP fc1 -> exact GELU -> fc2).
BLOCK_PARTS = [("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("norm2", "norm2"),
               ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")]           # the tensors of a transformer block
DECODER_PARTS = BLOCK_PARTS + [("skip_linear", "skip_linear"), ("skip_norm", "skip_norm"),
                               ("adaLN_modulation.1", "adaLN_modulation.1")]
NAME_TABLE = [
    # shared ViT encoder (RCMViT and EPGViT)
    ("patch_embed.proj.{p}", "encoder.patch_embed.{p}"), ("cls_token", "encoder.cls_token"),
    ("pos_embed", "encoder.pos_embed"), ("norm.{p}", "encoder.norm.{p}"),
    *[("blocks.{i}." + official + ".{p}", "encoder.blocks.{i}." + ours + ".{p}") for official, ours in BLOCK_PARTS],
    # RCMViT only: the projector (Linear 0, BN 1, ReLU 2, Linear 3, BN 4, ReLU 5, Linear 6), same indices
    ("projection_head.{i}.{p}", "projector.{i}.{p}"),
    # EPGViT only: class table, width bridge, decoder, head
    ("class_embed.weight", "class_embed.weight"), ("encoder_to_decoder.{p}", "enc_to_dec.{p}"),
    *[("decoder_blocks.{i}." + official + ".{p}", "dec_blocks.{i}." + ours + ".{p}") for official, ours in
      DECODER_PARTS],
    ("out_norm.{p}", "out_norm.{p}"), ("out.{p}", "out.{p}"),
]

# The official sampler (its sample.py, rcm/rcm_denoiser.py, configs): fp32 EMA weights, the denoiser output clamped
# to [-1, 1], Heun over 32 Karras points without a final sigma = 0 and CFG on (0.19 s, 1.61 s], or one consistency
# step; "imagenet" normalisation, but "simple" (2x - 1) for the unconditional consistency release. Its null class
# and time input 250 ln(sigma~ + 1e-44) equal ours (bit for bit on every grid used: tests/test_official.py).
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
NOT_OFFICIAL = "not an official EPG/RCM state dict (no top-level patch_embed.proj.weight, pos_embed and cls_token)"


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be read or does not match our models (one-line message)."""


def _rules(pairs):
    """(regex of one template with {i}/{p} as named groups, the other template) for each pair."""
    return [(re.compile(re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[A-Za-z_]+)")),
             target) for source, target in pairs]


_FORWARD = _rules(NAME_TABLE)
_BACKWARD = _rules((ours, official) for official, ours in NAME_TABLE)


def _rename(name, rules):
    """`name` renamed by the first rule it matches (_FORWARD: official -> ours, _BACKWARD: ours -> official)."""
    for regex, template in rules:
        match = regex.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def _strip_module_prefix(sd):
    """State dicts saved from a DistributedDataParallel wrapper carry 'module.' on every key; drop it."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def is_official_state_dict(sd):
    """True for the official key layout; False for our state dicts (keys under encoder.) and checkpoint files."""
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
    """dict(kind "rcm" | "epg", model (a models.MODEL_CONFIGS name), image_size, patch_size, num_classes (EPG: the
    null index, 0 without a class table), proj_dim (RCM projector output or None), depth, enc_dim, dec_dim)."""
    if not is_official_state_dict(sd):
        raise OfficialCheckpointError(NOT_OFFICIAL)
    sd = _strip_module_prefix(sd)
    patch_shape, pos_shape = _shape(sd, "patch_embed.proj.weight"), _shape(sd, "pos_embed")
    grid = math.isqrt(max(pos_shape[1] - 2, 0)) if len(pos_shape) == 3 else 0
    if len(patch_shape) != 4 or grid == 0 or grid * grid != pos_shape[1] - 2:   # other shapes: convert_state_dict
        raise OfficialCheckpointError(f"official patch embedding {patch_shape} and pos_embed {pos_shape} are not of "
                                      f"the shapes (D, 3, p, p) and (1, 2 + m*m, D)")
    depth, dec_depth = _block_count(sd, "blocks."), _block_count(sd, "decoder_blocks.")
    enc_dim, patch_size, kind = patch_shape[0], patch_shape[2], "epg" if dec_depth else "rcm"
    config = dict(kind=kind, image_size=grid * patch_size, patch_size=patch_size, depth=depth, enc_dim=enc_dim,
                  dec_dim=enc_dim, num_classes=None, proj_dim=None)
    if kind == "epg":
        config["dec_dim"] = _shape(sd, "out_norm.weight")[0]
        config["num_classes"] = _shape(sd, "class_embed.weight")[0] - 1 if "class_embed.weight" in sd else 0
    elif _block_count(sd, "projection_head."):
        config["proj_dim"] = _shape(sd, f"projection_head.{_block_count(sd, 'projection_head.') - 1}.weight")[0]
    # an RCM is named after the model whose decoder mirrors its encoder (RCM-B, not RCM-XL)
    size = (depth, enc_dim, config["dec_dim"], grid)
    names = [n for n, c in ((n, models.model_config(n)) for n in models.MODEL_CONFIGS)
             if (c["depth"], c["enc_dim"], c["dec_dim"], c["tokens_per_side"]) == size
             and (dec_depth == depth if kind == "epg" else c["dec_heads"] == c["enc_heads"])]
    if not names:
        decoder = f", decoder {dec_depth}x{config['dec_dim']}" if dec_depth else ""
        raise OfficialCheckpointError(f"official {kind.upper()} checkpoint (encoder {depth}x{enc_dim}{decoder}, patch "
                                      f"{patch_size} at {config['image_size']}px) matches none of our model "
                                      f"configurations ({', '.join(models.MODEL_CONFIGS)}); add it to "
                                      f"models.MODEL_CONFIGS with its head counts")
    config["model"] = names[0]
    return config


def build_model(config):
    """Our model (random init) for an inferred official `config`, to load the converted state dict into."""
    if config["kind"] == "epg":
        return models.build_epg(config["model"], config["image_size"], config["num_classes"])
    return models.build_rcm(config["model"], config["image_size"], config["proj_dim"])


def convert_state_dict(sd):
    """Official RCMViT / EPGViT state dict -> (infer_official_config(sd), our state dict for build_model(config)):
    every tensor used once and every one of ours filled, else an error names the missing, unexpected and
    wrong-shaped ones."""
    sd = _strip_module_prefix(sd) if isinstance(sd, dict) else sd
    config = infer_official_config(sd)
    kind = config["kind"]
    with torch.device("meta"):                                             # shapes only, no memory
        target = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    if kind == "rcm" and config["proj_dim"] is None:                      # saved without projector: encoder only
        target = {k: v for k, v in target.items() if k.startswith("encoder.")}
    if kind == "epg" and config["num_classes"] == 0:
        # unconditional (no class embedding): our EPG's one class row, the null class 0, is filled with zeros below
        del target["class_embed.weight"]

    converted, matched, unexpected, wrong_shape = {}, set(), [], []
    for name, tensor in sd.items():
        ours = _rename(name, _FORWARD)
        if ours not in target:
            unexpected.append(name)
            continue
        matched.add(ours)
        if tuple(tensor.shape) != target[ours]:
            wrong_shape.append(f"{name} {tuple(tensor.shape)} vs {target[ours]}")
        else:
            converted[ours] = tensor
    missing = [_rename(k, _BACKWARD) for k in target if k not in matched]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped (got vs expected)",
                                                                            wrong_shape)):
        if names:
            problems.append(f"{len(names)} {label} [{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}]")
    if problems:
        raise OfficialCheckpointError(f"official {kind.upper()} checkpoint does not match our {kind.upper()}-"
                                      f"{config['model']} at {config['image_size']}px: " + "; ".join(problems))
    if kind == "epg" and config["num_classes"] == 0:
        converted["class_embed.weight"] = torch.zeros(1, config["enc_dim"], dtype=sd["pos_embed"].dtype)
    return config, converted


def official_sampling(config):
    """(stage, normalize, sampling) of the official sampler for the EPG of `config`. The stage comes from the
    released generators (weights do not tell); cfg_scale is left out where unknown or unused (unconditional)."""
    stage, cfg_scale = RELEASED_GENERATORS.get((config["model"], config["image_size"]), ("diffusion", None))
    conditional = config["num_classes"] > 0
    sampling = dict(OFFICIAL_SAMPLING[stage])
    if cfg_scale is not None and conditional:
        sampling["cfg_scale"] = cfg_scale
    return stage, "imagenet" if conditional else "simple", sampling


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
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise OfficialCheckpointError(f"'{file}' is unreadable or corrupt ({type(e).__name__}); use another "
                                      f"checkpoint") from None
    if not is_official_state_dict(sd):
        raise OfficialCheckpointError(f"'{file}' is {NOT_OFFICIAL}")
    return sd


def official_checkpoint(path, weights=None):
    """One of our checkpoints (see the module docstring) from a released folder or .pth file.
    weights: "ema" | "online" | None (the official scripts' choice: EMA for an EPG, online for an RCM)."""
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
    """Write official_checkpoint(src, weights) to `out` atomically (temporary file in the same folder, fsync,
    rename); an existing `out` is never overwritten. Returns the checkpoint."""
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="convert")
    command = commands.add_parser("convert", help="write one of our checkpoints from a released folder or .pth file")
    command.add_argument("src", metavar="SRC", help="a released folder (nnet_ema.pth / nnet.pth) or one .pth file")
    command.add_argument("out", metavar="OUT.pt", help="the checkpoint to write (must not exist)")
    command.add_argument("--weights", choices=tuple(CHECKPOINT_FILES),
                         help="in a folder: nnet_ema.pth (ema) or nnet.pth (online); default: ema (EPG), online (RCM)")
    args = parser.parse_args(argv)
    try:
        checkpoint = convert(args.src, args.out, args.weights)
    except OfficialCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cfg, stage = checkpoint["config"], checkpoint["stage"]
    sampling = ", ".join(f"{k} {v}" for k, v in cfg.get("sampling", {}).items())
    print(f"wrote {args.out}: {'RCM' if stage == 'pretrain' else 'EPG'}-{cfg['model']}/{cfg['patch_size']} at "
          f"{cfg['image_size']}px, stage {stage}, normalize {cfg['normalize']}, from {cfg['converted_from']}"
          + (f"; sampling defaults: {sampling}" if sampling else ""))


if __name__ == "__main__":
    main()
