"""Sample-quality metrics: FID, sFID, Inception Score and improved precision/recall, as the evaluator the paper reports
against computes them (ADM's, with the 2015-12-05 TensorFlow Inception-v3 graph), numerically compatible with
pytorch-fid / torch-fidelity:

    metric      features (per image)                          statistic
    FID         pool_3, 2048-d                                Frechet distance of Gaussians (float64, unbiased cov)
    sFID        mixed_6/conv, first 7 channels, 17*17*7=2023  same
    IS          softmax(pool_3 @ W), 1008 classes, no bias    exp E[KL(p(y|x) || p(y))], mean over chunks of 5000
    Prec/Rec    pool_3, 2048-d                                k-NN manifolds, k = 3 (Kynkaanniemi et al. 2019)

The network loads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's file of the same hash)
strictly. Resize of the uint8 images (any size) to 299: --resize tf (default), TF1's bilinear resize of the ADM
evaluator's graph and torch-fidelity, comparable with ADM batches and papers; --resize pytorch-fid, pytorch-fid's.

SAMPLES and REFERENCE may each be a folder of .png/.jpg/.jpeg images (sorted by name, one size); a sample npz
(`arr_0` (N, H, W, 3) uint8, read memory-mapped); an ADM reference batch (its precomputed `mu`, `sigma`, `mu_s`,
`sigma_s` describe the whole data set and are used for FID/sFID, its `arr_0` for precision/recall); or a statistics
file of `--save-stats`: `mu`, `sigma` (pytorch-fid's keys), `mu_s`, `sigma_s`, `pool_features` (N, 2048) and
`logits` (N, 1008) float32, `resize` and `image_size`. A pytorch-fid stats file (mu, sigma) gives FID only.

    python fid.py SAMPLES REFERENCE [--inception PATH] [--batch-size 100] [--device cuda] [--resize tf] [--out m.json]
    python fid.py SAMPLES --save-stats stats.npz
    torchrun --nproc_per_node 8 fid.py samples.npz VIRTUAL_imagenet256_labeled.npz

Inception weights are never downloaded (find_inception_weights). The embedded shapes data set is scored without
Inception: `python shapes.py score SAMPLES.npz`.
"""
import argparse
import concurrent.futures
import hashlib
import math
import os
import shutil
import struct
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import linalg
from torchvision.models import inception

import data
import rundir
import trainlib

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FILENAME_TORCH_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7          # ADM: mixed_6/conv[..., :7]
IS_SPLIT_SIZE = 5000          # ADM: consecutive chunks of 5000 images, mean over chunks
PR_NEIGHBOURS = 3             # k of the k-NN manifold radius (Kynkaanniemi et al. 2019; ADM)
RESIZE_MODES = ("tf", "pytorch-fid")
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool_features", "logits")


# ---- The FID Inception-v3 (the 2015-12-05 TF graph as pytorch-fid ports it) ----
def tf_avg_pool_3x3(x):
    """3x3/1 average pool whose border windows average only real pixels (TF 'SAME'; torchvision counts the pad)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


# The FID graph differs from torchvision's Inception-v3 in three blocks only (pytorch-fid's FIDInceptionA/C/E): their
# average pools ignore the zero padding, and Mixed_7c pools with a max. Layers and parameter names are torchvision's.
class InceptionA(inception.InceptionA):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3dbl, self.branch_pool(tf_avg_pool_3x3(x))], dim=1)


class InceptionC(inception.InceptionC):
    """17x17 block (Mixed_6b..e), factorised 7x7 convolutions: 1x1 | 1x1-1x7-7x1 | 1x1-(7x1-1x7)x2 | avgpool-1x1."""

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(tf_avg_pool_3x3(x))], dim=1)


class InceptionE(inception.InceptionE):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 outputs; pool="avg" (TF 'SAME') in Mixed_7b, "max" in Mixed_7c."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(b3dbl),
                          self.branch3x3dbl_3b(b3dbl), self.branch_pool(pooled)], dim=1)


def resize_bilinear_tf1(images, size=INCEPTION_SIZE):
    """TensorFlow 1.x `ResizeBilinear` (align_corners=False, half_pixel_centers=False) of the FID graph, (N, C, H, W):
    output pixel i samples the input at src = i * (in / out) (a float32 scale, no half-pixel offset, unlike
    F.interpolate), from rows/columns floor(src) and min(floor(src) + 1, in - 1)."""
    def sample_positions(in_len):
        scale = torch.tensor(in_len, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32) * scale
        lo = src.long()                                  # src >= 0: truncation is floor
        hi = (lo + 1).clamp(max=in_len - 1)
        return lo.to(images.device), hi.to(images.device), (src - lo.float()).to(images.device, images.dtype)

    y_lo, y_hi, fy = sample_positions(images.shape[2])
    x_lo, x_hi, fx = sample_positions(images.shape[3])
    top, bottom = images[:, :, y_lo, :], images[:, :, y_hi, :]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * fx
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * fx
    return top + (bottom - top) * fy[:, None]


class FIDInceptionV3(inception.Inception3):
    """Inception-v3 of the FID graph. forward(uint8 (N, 3, H, W)) -> dict of float32 features per image:
        "pool"    (N, 2048)  pool_3 (FID, precision/recall)
        "spatial" (N, 2023)  mixed_6/conv = Mixed_6d.branch1x1 after its ReLU, channels [:7], flattened in (h, w, c)
                             order, as ADM: its reference batches' mu_s/sigma_s compare (sFID)
        "logits"  (N, 1008)  pool_3 @ W without the bias, as ADM's Inception Score (softmax/logits/MatMul)
    """

    def __init__(self, resize="tf"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode '{resize}': choose one of {RESIZE_MODES}")
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)   # 1008 classes as in the TF graph
        self.resize = resize
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, channels_7x7=128), InceptionC(768, channels_7x7=160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, channels_7x7=160), InceptionC(768, channels_7x7=192)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, pool="avg"), InceptionE(2048, pool="max")

    def forward(self, images_uint8):
        x = images_uint8.float()
        if self.resize == "tf":                                               # (N, 3, 299, 299) in [-1, 1]
            x = (resize_bilinear_tf1(x, INCEPTION_SIZE) - 128) / 128
        else:
            x = 2 * F.interpolate(x / 255, size=(INCEPTION_SIZE,) * 2, mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))     # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                    # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                    # (N, 768, 17, 17)
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]            # (N, 7, 17, 17)  mixed_6/conv
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)                      # (N, 2023), TF's NHWC order
        x = self.Mixed_6e(self.Mixed_6d(x))                                   # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                    # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                             # (N, 2048)  pool_3
        logits = pool @ self.fc.weight.T                                      # (N, 1008)  no bias
        return {"pool": pool, "spatial": spatial, "logits": logits}


# ---- Weights: found locally, checked, never downloaded ----
def find_inception_weights(path=None):
    """`path`, else $EPG_INCEPTION, else the torch hub cache, whose file must have the sha256 prefix 6726825d (a file
    given explicitly that does not only triggers a warning, so that test weights can be used)."""
    explicit, hub_dir = path or os.environ.get("EPG_INCEPTION"), Path(torch.hub.get_dir()) / "checkpoints"
    if explicit:
        file = Path(explicit).expanduser()
        if not file.is_file():
            raise rundir.UserError(f"Inception weights file '{file}' does not exist (given by "
                                   f"{'--inception' if path else 'EPG_INCEPTION'}); point it at {INCEPTION_FILENAME}")
    else:
        file = next((f for f in (hub_dir / INCEPTION_FILENAME, hub_dir / INCEPTION_FILENAME_TORCH_FIDELITY)
                     if f.is_file()), None)
        if file is None:
            raise rundir.UserError(f"Inception weights {INCEPTION_FILENAME} not found (fid.py never downloads): fetch "
                                   f"{INCEPTION_URL} (pytorch-fid's GitHub release) and put it in {hub_dir}/, or pass "
                                   f"--inception PATH, or set EPG_INCEPTION=PATH")
    with open(file, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest.startswith(INCEPTION_SHA256_PREFIX):
        return file
    if not explicit:
        raise rundir.UserError(f"'{file}' is corrupt (sha256 {digest[:8]}..., expected {INCEPTION_SHA256_PREFIX}...): "
                               f"delete it and download it again from {INCEPTION_URL}")
    warnings.warn(f"'{file}' has sha256 {digest[:8]}..., not {INCEPTION_SHA256_PREFIX}...: these are not the FID "
                  f"Inception weights, so the numbers are not comparable with published FIDs")
    return file


def load_inception(path=None, device="cpu", resize="tf"):
    """FIDInceptionV3 in eval mode, loaded strictly but for BatchNorm's num_batches_tracked (pytorch-fid lacks them)."""
    path = find_inception_weights(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                   # truncated zip, not a torch file, pickled objects...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise rundir.UserError(f"cannot read Inception weights '{path}' ({reason}): the file is corrupt or not a "
                               f"state dict; download {INCEPTION_FILENAME} again from {INCEPTION_URL}") from None
    model = FIDInceptionV3(resize)
    keys = set(state_dict) if isinstance(state_dict, dict) else set()
    missing = sorted(k for k in set(model.state_dict()) - keys if not k.endswith("num_batches_tracked"))
    unexpected = sorted(keys - set(model.state_dict()))
    if missing or unexpected:
        raise rundir.UserError(f"'{path}' is not the FID Inception state dict: {len(missing)} missing keys (e.g. "
                               f"{missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise rundir.UserError(f"'{path}' has tensors of the wrong shape for the FID Inception: "
                               f"{str(e).strip().splitlines()[-1].strip()}") from None
    return model.eval().requires_grad_(False).to(device)


# ---- Inputs: image folders, sample npz files, ADM reference batches, statistics files ----
class FolderImages:
    """The .png/.jpg/.jpeg images of a folder, sorted by name; read(start, stop) -> uint8 (n, H, W, 3)."""

    def __init__(self, folder):
        self.files = sorted(p for p in Path(folder).iterdir() if data.is_image_file(p.name))
        if not self.files:
            raise rundir.UserError(f"folder '{folder}' contains no {'/'.join(data.IMAGE_EXTENSIONS)} images")
        self.image_shape = self._load(self.files[0]).shape

    def __len__(self):
        return len(self.files)

    def _load(self, file):
        from PIL import Image
        try:
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB"))
        except Exception as e:
            raise rundir.UserError(f"cannot read image '{file}': {e}") from None

    def read(self, start, stop):
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(self._load, self.files[start:stop]))
        for file, image in zip(self.files[start:stop], images):
            if image.shape != self.image_shape:
                raise rundir.UserError(f"'{file}' is {image.shape[1]}x{image.shape[0]} but '{self.files[0].name}' is "
                                       f"{self.image_shape[1]}x{self.image_shape[0]}: all images must have one size")
        return np.stack(images)


class NpzImages:
    """`arr_0` of an npz file, (N, H, W, 3) uint8, without loading it whole (a 50k x 256^2 sample batch is 10 GB):
    memory-mapped when stored uncompressed (np.savez), loaded when compressed. read(start, stop) -> (n, H, W, 3)."""

    def __init__(self, path, key="arr_0"):
        member = key + ".npy"
        with zipfile.ZipFile(path) as archive, archive.open(member) as f:
            info = archive.getinfo(member)
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
            header_bytes = f.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
            raise rundir.UserError(f"'{path}': {key} must be uint8 images of shape (N, H, W, 3) (NHWC, as written by "
                                   f"np.savez), got {dtype} {shape}")
        if shape[0] == 0:
            raise rundir.UserError(f"'{path}' holds no images ({key} has shape {shape})")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as raw:              # data start = local file header (30 bytes + name + extra)
                raw.seek(info.header_offset)
                name_length, extra_length = struct.unpack("<HH", raw.read(30)[26:30])
            offset = info.header_offset + 30 + name_length + extra_length + header_bytes
            self.array = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
        else:
            with np.load(path) as npz:
                self.array = npz[key]
        self.image_shape = shape[1:]

    def __len__(self):
        return len(self.array)

    def read(self, start, stop):
        return np.array(self.array[start:stop])                     # a writable copy, not a view of the file


def check_statistics(stats, source):
    for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean_key in stats) != (cov_key in stats):
            present, absent = (mean_key, cov_key) if mean_key in stats else (cov_key, mean_key)
            raise rundir.UserError(f"'{source}' has '{present}' but not '{absent}'")
        if mean_key in stats:
            mu, sigma = stats[mean_key], stats[cov_key]
            if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
                raise rundir.UserError(f"'{source}': {mean_key}/{cov_key} must be floating point, got "
                                       f"{mu.dtype}/{sigma.dtype}")
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                raise rundir.UserError(f"'{source}': {mean_key} must have shape (D,) and {cov_key} (D, D), got "
                                       f"{mu.shape} and {sigma.shape}")
    for key, dim in (("pool_features", 2048), ("logits", 1008)):
        if key in stats and (stats[key].ndim != 2 or stats[key].shape[1] != dim
                             or not np.issubdtype(stats[key].dtype, np.floating)):
            raise rundir.UserError(f"'{source}': {key} must be float of shape (N, {dim}), got {stats[key].dtype} "
                                   f"{stats[key].shape}")


class EvalInput:
    """One side of the comparison: images (FolderImages / NpzImages, None for statistics), stats (arrays among
    STATS_KEYS, mu/sigma float64), the recorded resize and image_size (H, W), where known."""

    def __init__(self, name, images=None, stats=None, resize=None, image_size=None):
        self.name, self.images, self.stats, self.resize = name, images, stats or {}, resize
        self.image_size = tuple(images.image_shape[:2]) if images is not None else image_size


def open_input(path):
    """EvalInput of a folder of images, a sample npz, an ADM reference batch or a statistics file."""
    path = Path(path)
    if path.is_dir():
        return EvalInput(str(path), images=FolderImages(path))
    if not path.is_file():
        raise rundir.UserError(f"'{path}' does not exist (expected a folder of images or an .npz file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            stats = {k: np.asarray(npz[k]) for k in STATS_KEYS if k in keys}
            resize = str(npz["resize"]) if "resize" in keys else None
            image_size = tuple(int(v) for v in npz["image_size"]) if "image_size" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise rundir.UserError(f"cannot read '{path}' as an npz file: {e}") from None
    if not keys & {"arr_0", "mu", "pool_features"}:
        raise rundir.UserError(f"'{path}' has keys {sorted(keys)}: expected 'arr_0' (images, N x H x W x 3 uint8) "
                               f"and/or statistics 'mu', 'sigma' (see --save-stats)")
    check_statistics(stats, path)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        if key in stats:
            stats[key] = stats[key].astype(np.float64)
    images = NpzImages(path) if "arr_0" in keys else None
    return EvalInput(str(path), images=images, stats=stats, resize=resize, image_size=image_size)


# ---- Feature extraction, sharded over the ranks of torchrun ----
def all_gather_rows(local, total):
    """Concatenate each rank's contiguous block of rows (rank order = image order) and trim to `total` rows."""
    _, world = trainlib.rank_world()
    if world == 1:
        return local
    padded = local.new_zeros((math.ceil(total / world), *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[:total]


@torch.no_grad()
def extract_features(model, images, batch_size=100, device="cpu", progress=True, description="features"):
    """{key: float32 numpy (N, D)} of `model` (uint8 (n, 3, H, W) -> {key: (n, D)}) over FolderImages / NpzImages,
    TF32 off. Each rank of torchrun takes a contiguous block, gathered in rank order: the result is in image order
    and, up to float32 rounding, independent of the number of ranks."""
    from tqdm import tqdm
    rank, world = trainlib.rank_world()
    total = len(images)
    per_rank = math.ceil(total / world)
    begin, end = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # full float32 convolutions
    to_input = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(device).permute(0, 3, 1, 2)
    outputs = {}
    try:
        bar = tqdm(total=total, desc=description, unit="img", disable=not progress or rank != 0, file=sys.stderr)
        for start in range(begin, end, batch_size):
            batch = to_input(images.read(start, min(start + batch_size, end)))
            for key, value in model(batch).items():
                outputs.setdefault(key, []).append(value.float())
            bar.update(len(batch) * world)
        bar.close()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if not outputs:                    # a rank without images still has to join the gather with the right shapes
        outputs = {key: [value.float()[:0]] for key, value in model(to_input(images.read(0, 1))).items()}
    return {key: all_gather_rows(torch.cat(chunks), total).cpu().numpy() for key, chunks in outputs.items()}


# ---- The metrics ----
def gaussian_statistics(features):
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise rundir.UserError(f"need at least 2 images for a covariance, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix):
    """scipy's square root X of `matrix`, or None where there is none: X not finite (SciPy < 1.16 on a singular
    product, what pytorch-fid tests for) or X @ X != matrix (SciPy >= 1.16 may return huge finite entries instead)."""
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(matrix)
        ok = np.isfinite(root).all() and np.linalg.norm(root @ root - matrix) <= 1e-6 * np.linalg.norm(matrix)
    return root if ok else None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, as pytorch-fid and the ADM evaluator compute it.
    A singular S1 S2 may have no square root: then eps*I is added to both covariances and sqrtm retried. A complex
    root whose diagonal's imaginary part is within 1e-3 of 0 is rounding noise and is dropped; a larger one
    (covariances that are not positive semi-definite) is an error."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise rundir.UserError(f"statistics have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]} (were both "
                               f"computed from the same layer, e.g. 2048-d pool_3?)")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise rundir.UserError("statistics contain NaN or infinite values")
    covmean = _sqrtm(sigma1 @ sigma2)
    if covmean is None:
        warnings.warn(f"Frechet distance: singular product of covariances; adding {eps} to their diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise rundir.UserError(f"Frechet distance: the covariance product has no square root, even with {eps} "
                                   f"added to the diagonals")
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise rundir.UserError(f"Frechet distance: imaginary component {imaginary:.3g} on the diagonal of the "
                                   f"square root of the covariance product: the covariances are not positive "
                                   f"semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """Inception Score, ADM convention: p(y|x) = softmax(logits), consecutive chunks of `split_size` images (the last
    may be shorter), IS_chunk = exp(mean_x KL(p(y|x) || mean_x p(y|x))), mean over chunks. float64, 0 log 0 = 0."""
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        chunk_log_p = log_p[start:start + split_size]
        chunk_p = chunk_log_p.exp()
        log_marginal = torch.logsumexp(chunk_log_p, dim=0) - math.log(len(chunk_log_p))         # (C,)
        kl = torch.where(chunk_p > 0, chunk_p * (chunk_log_p - log_marginal), torch.zeros_like(chunk_p)).sum(1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores))


def _squared_distances(a, b):
    """(n, D), (m, D) -> (n, m) squared Euclidean distances |a|^2 - 2 a.b + |b|^2, clamped at 0 (as ADM)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_(min=0)


def _row_blocks(points, n_cols, budget=1 << 25):
    return points.split(max(1, budget // max(1, n_cols)))          # about `budget` distances per block


def manifold_radii(features, k=PR_NEIGHBOURS):
    """Squared distance of each point to its k-th nearest neighbour in the same set, itself excluded. (N, D) -> (N,)."""
    if len(features) <= k:
        raise rundir.UserError(f"precision/recall with k={k} needs more than {k} images per set, got {len(features)}")
    return torch.cat([_squared_distances(block, features).kthvalue(k + 1, dim=1).values
                      for block in _row_blocks(features, len(features))])


def _inside_manifold(points, centres, radii):
    """(N,) bool: point i lies in some ball {x : |x - centre_j|^2 <= radius_j} (radii squared)."""
    return torch.cat([(_squared_distances(block, centres) <= radii[None, :]).any(dim=1)
                      for block in _row_blocks(points, len(centres))])


def precision_recall(real_features, fake_features, k=PR_NEIGHBOURS, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's conventions, float64: precision = fraction
    of fake points inside the k-NN manifold of the real ones, recall = the converse."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64, device=device)
    precision = _inside_manifold(fake, real, manifold_radii(real, k)).double().mean().item()
    recall = _inside_manifold(real, fake, manifold_radii(fake, k)).double().mean().item()
    return precision, recall


# ---- Statistics of an input, the full evaluation, and the files written ----
def input_statistics(source, model, batch_size=100, device="cpu", progress=True):
    """mu, sigma, mu_s, sigma_s, pool_features, logits of one input, as far as they can be had. Precomputed ones win:
    an ADM reference batch's statistics describe the whole data set, its arr_0 only a 10k subset."""
    stats = dict(source.stats)
    if source.images is not None and not {"mu", "pool_features", "logits"} <= set(stats):
        features = extract_features(model, source.images, batch_size, device, progress, Path(source.name).name)
        stats.setdefault("pool_features", features["pool"])
        stats.setdefault("logits", features["logits"])
        if "mu_s" not in stats:
            stats["mu_s"], stats["sigma_s"] = gaussian_statistics(features["spatial"])
    if "mu" not in stats and "pool_features" in stats:
        stats["mu"], stats["sigma"] = gaussian_statistics(stats["pool_features"])
    return stats


def evaluate(samples, reference, model, batch_size=100, device="cpu", progress=True):
    """(metrics computable from two EvalInputs: FID, sFID, IS, Precision, Recall; notes on the others), rank 0."""
    ours = input_statistics(samples, model, batch_size, device, progress)
    ref = input_statistics(reference, model, batch_size, device, progress)
    metrics, notes = {}, []
    if trainlib.rank_world()[0] != 0:      # under torchrun the features are shared; rank 0 computes the metrics
        return metrics, notes

    def both_have(key, metric):
        if key in ours and key in ref:
            return True
        notes.append(f"{metric} skipped: no {key} for {(samples if key not in ours else reference).name}")
        return False

    for metric, mean, cov in (("FID", "mu", "sigma"), ("sFID", "mu_s", "sigma_s")):
        if both_have(mean, metric):
            metrics[metric] = frechet_distance(ours[mean], ours[cov], ref[mean], ref[cov])
    if "logits" in ours:
        metrics["IS"] = inception_score(ours["logits"])
    else:
        notes.append(f"IS skipped: no logits for {samples.name}")
    if both_have("pool_features", "Precision/Recall"):
        metrics["Precision"], metrics["Recall"] = precision_recall(
            ref["pool_features"], ours["pool_features"], device=device)
    return metrics, notes


def check_destination(path, needed_bytes):
    """Before any computation: the folder of `path` exists, takes a file, and has `needed_bytes` free."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise rundir.UserError(f"cannot write '{path}': folder '{folder}' does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise rundir.UserError(f"cannot write '{path}': folder '{folder}' is not writable ({e.strerror})") from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise rundir.UserError(f"cannot write '{path}': it needs about {needed_bytes / 1e6:.3g} MB, the disk of "
                               f"'{folder}' has {free / 1e6:.3g} MB free")


def save_statistics(path, stats, resize, image_size):
    """Write a statistics file (keys: see the module docstring) atomically."""
    arrays = {key: stats[key] for key in STATS_KEYS if key in stats}
    rundir.write_atomically(path, lambda f: np.savez(f, resize=np.array(resize), image_size=np.array(image_size),
                                                       **arrays))


# ---- Command line ----
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", metavar="SAMPLES", help="a folder of png/jpg, a sample npz or a statistics file")
    parser.add_argument("reference", metavar="REFERENCE", nargs="?",
                        help="an ADM reference batch, a statistics file, a sample npz or a folder (not with "
                             "--save-stats)")
    parser.add_argument("--inception", metavar="PATH", default=None,
                        help=f"Inception weights ({INCEPTION_FILENAME}); default: $EPG_INCEPTION, else "
                             f"torch.hub.get_dir()/checkpoints/. Never downloaded")
    parser.add_argument("--batch-size", type=int, default=100, help="images per forward pass and rank (default 100)")
    parser.add_argument("--device", default=None, help="default: cuda if available (under torchrun cuda:LOCAL_RANK)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="tf",
                        help="tf: as the ADM evaluator / torch-fidelity (default); pytorch-fid: as pytorch-fid")
    parser.add_argument("--save-stats", metavar="OUT.npz", default=None,
                        help="write the statistics of SAMPLES to OUT.npz instead of comparing with a REFERENCE")
    parser.add_argument("--out", metavar="metrics.json", default=None, help="also write the metrics as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not args.save_stats and args.reference is None:
        parser.error("give a REFERENCE (e.g. an ADM reference batch), or --save-stats OUT.npz")
    return args


def run(args):
    """Inputs and destinations are checked first, then the weights loaded, then the features computed."""
    samples = open_input(args.samples)
    if args.save_stats:
        if samples.images is None:
            raise rundir.UserError(f"'{args.samples}' already holds statistics and no images; nothing to compute")
        # about the file's size: two float64 Gaussians and the float32 per-image features
        check_destination(args.save_stats, 8 * (2048 + 2048 ** 2 + 2023 + 2023 ** 2)
                          + 4 * len(samples.images) * (2048 + 1008) + 4096)
    else:
        reference = open_input(args.reference)
        if None not in (samples.image_size, reference.image_size) and samples.image_size != reference.image_size:
            (h1, w1), (h2, w2) = samples.image_size, reference.image_size   # Inception would resize both to 299
            raise rundir.UserError(f"'{samples.name}' holds {w1}x{h1} images but '{reference.name}' {w2}x{h2}: compare "
                                   f"samples with a reference of the same resolution")
        if args.out:
            check_destination(args.out, 4096)
    device = trainlib.init_device(args.device)
    rank = trainlib.rank_world()[0]
    progress = not args.no_progress
    if args.save_stats:
        stats = input_statistics(samples, load_inception(args.inception, device, args.resize), args.batch_size,
                                 device, progress)
        if rank == 0:
            save_statistics(args.save_stats, stats, args.resize, samples.image_size)
            print(f"statistics of {len(samples.images)} images written to {args.save_stats}", file=sys.stderr)
        return
    for source in (samples, reference):            # ADM reference batches come from the TF graph: "tf"
        recorded = source.resize or ("tf" if "mu_s" in source.stats else None)
        if rank == 0 and recorded not in (None, args.resize):
            print(f"warning: the statistics in '{source.name}' were computed with --resize {recorded}, this run "
                  f"uses --resize {args.resize}: the numbers mix two preprocessings", file=sys.stderr)
    needs_inception = samples.images is not None or reference.images is not None
    model = load_inception(args.inception, device, args.resize) if needs_inception else None
    metrics, notes = evaluate(samples, reference, model, args.batch_size, device, progress)
    if rank == 0:
        for note in notes:
            print("note: " + note, file=sys.stderr)
        for name, value in metrics.items():
            print(f"{name}: {value:.8g}")
        if args.out:
            rundir.write_json(args.out, metrics)


def main(argv=None):
    rundir.cli_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
