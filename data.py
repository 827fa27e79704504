"""Data for EPG: normalisation, the embedded shapes data set and its reference classifier, image folders,
MoCo v3 views (torchvision transforms) and a deterministic, resumable, DDP-sharded batch stream.

Command line: `python data.py prepare SRC DST` (ADM center crop), `preview --out grid.png`, `score SAMPLES.npz`.
Images travel as uint8 tensors (3, H, W) until the views turn them into normalised floats.
"""

import argparse
import colorsys
import contextlib
import functools
import itertools
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import v2


class DataError(Exception):
    """User-facing data problem; CLIs print str(e) and exit 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------------

NORMALIZATIONS = ("simple", "imagenet")
# model = (x01 - shift) / scale.  simple: 2x - 1 (EDM).  imagenet: the official code's std="imagenet", the ImageNet
# mean and *twice* the ImageNet std (per channel about zero mean, std 0.5 = sigma_data).
_SHIFT_SCALE = {"simple": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "imagenet": ((0.485, 0.456, 0.406), (2 * 0.229, 2 * 0.224, 2 * 0.225))}


def _shift_scale(mode, like):
    if mode not in _SHIFT_SCALE:
        raise DataError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return (torch.tensor(v, dtype=dtype, device=like.device).view(3, 1, 1) for v in _SHIFT_SCALE[mode])


def normalize(x01, mode="simple"):
    """Pixels in [0, 1], float (..., 3, H, W) -> model space."""
    shift, scale = _shift_scale(mode, x01)
    return (x01 - shift) / scale


def denormalize(x, mode="simple"):
    """Exact inverse of ``normalize`` (no clamping)."""
    shift, scale = _shift_scale(mode, x)
    return x * scale + shift


def data_range(mode="simple"):
    """(lo, hi): float tensors (3,) = normalize(0), normalize(1): the box the sampler clamps to."""
    return normalize(torch.zeros(3, 1, 1), mode).flatten(), normalize(torch.ones(3, 1, 1), mode).flatten()


def to_uint8_hwc(x, mode="simple"):
    """Model space (N, 3, H, W) -> uint8 numpy (N, H, W, 3): denormalize, clamp to [0, 1], * 255, round.
    The one quantisation used for saved samples and FID."""
    x = x.unsqueeze(0) if x.dim() == 3 else x
    pixels = denormalize(x.detach().float(), mode).clamp(0.0, 1.0).mul(255.0).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, columns):
    """Tile uint8 images (N, H, W, 3) into one PNG, `columns` per row, 2 px white gaps (torchvision's make_grid)."""
    from torchvision.utils import make_grid
    grid = make_grid(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), nrow=columns, padding=2,
                     pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def class_grid(images, labels, path, max_classes=10, per_class=10):
    """One row per class (the first `max_classes` classes present), up to `per_class` images each, blanks white."""
    rows = []
    for label in sorted(set(labels.tolist()))[:max_classes]:
        picked = list(np.flatnonzero(labels == label)[:per_class])
        rows += [images[k] for k in picked] + [np.full(images.shape[1:], 255, np.uint8)] * (per_class - len(picked))
    save_grid(np.stack(rows), path, per_class)


def _mix_seed(*values):
    """Hash non-negative integers into one well-mixed 63-bit seed (NumPy's SeedSequence)."""
    words = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


# Stream tags, so that different uses of the same (seed, index) never share random numbers.
_TAG_SHAPES, _TAG_PERMUTATION, _TAG_AUGMENT = 11, 12, 13
_SPLITS = {"train": 0, "val": 1}


# ---------------------------------------------------------------------------------------------------------------------
# Embedded data set: procedurally drawn shapes
# ---------------------------------------------------------------------------------------------------------------------

def _regular_polygon(corners, phase, radii=(1.0,)):
    """Unit polygon: `corners` vertices on circles of the given radii (cycled), first vertex at angle `phase`."""
    angles = phase + 2.0 * math.pi * np.arange(corners) / corners
    r = np.resize(np.asarray(radii, dtype=np.float64), corners)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _heart():
    """Parametric heart, centred and scaled to the unit disc (y points down, as in images)."""
    t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.max(0) + points.min(0)) / 2.0
    return points / np.linalg.norm(points, axis=1).max()


def _cross(w=0.3):
    outline = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w),
               (-w, 1)]
    return np.asarray(outline, dtype=np.float64) * 0.95


_ARROW = np.asarray([(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)],
                    dtype=np.float64)
# Polygons in unit coordinates (radius <= 1); circle, ring and crescent are drawn from discs instead.
_POLYGONS = {"square": _regular_polygon(4, math.pi / 4), "triangle": _regular_polygon(3, -math.pi / 2),
             "star": _regular_polygon(10, -math.pi / 2, radii=(1.0, 0.42)), "cross": _cross(),
             "hexagon": _regular_polygon(6, 0.0), "heart": _heart(), "arrow": _ARROW}
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart", "arrow", "crescent")


class EmbeddedShapes(torch.utils.data.Dataset):
    """The default data set, drawn in code: deterministic per (seed, split, index); returns (uint8 (3, H, W), label).

    Item i shows shape i % 10 (every prefix of 10 items is balanced) with a random colour (hue around a class centre,
    overlapping between classes), size (radius 30-40 % of the image), position (centre within +-8 % of the middle),
    a rotation of at most 15 degrees, background (flat, gradient, smooth colour noise or soft stripes) and a little
    pixel noise.  Shapes are drawn 4x (2x above 64 px) larger and box-downsampled (anti-aliased at every
    resolution).  The split is part of the seed, so train and val differ.
    """

    num_classes = 10
    classes = list(SHAPE_CLASSES)

    def __init__(self, split="train", image_size=32, seed=0, length=None):
        if split not in _SPLITS:
            raise DataError(f"unknown split {split!r}; choose 'train' or 'val'")
        if int(image_size) < 8:
            raise DataError(f"image size {image_size} is too small for the embedded data set; use 8 or more")
        if int(seed) < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.split, self.image_size, self.seed = split, int(image_size), int(seed)
        self.length = int(length) if length is not None else (50_000 if split == "train" else 1_000)
        self.supersample = 4 if self.image_size <= 64 else 2
        coords = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size
        self._grid_y, self._grid_x = np.meshgrid(coords, coords, indexing="ij")  # (H, W) each, in (0, 1)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], i, _TAG_SHAPES])
        image = self._render(rng, SHAPE_CLASSES[label])
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), label

    def _background(self, rng):
        """(H, W, 3) float32 in [0, 1]."""
        size, kind = self.image_size, rng.integers(4)
        first, second = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
        if kind == 0:  # flat colour
            return np.broadcast_to(first, (size, size, 3)).copy()
        angle = rng.uniform(0.0, 2.0 * math.pi)
        u = (self._grid_x - 0.5) * math.cos(angle) + (self._grid_y - 0.5) * math.sin(angle)  # (H, W)
        if kind == 1:  # linear gradient between two colours
            weight = np.clip(u + 0.5, 0.0, 1.0)
        elif kind == 2:  # smooth colour noise: a random 4x4 colour grid, bicubically upsampled
            grid = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
            smooth = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
            return np.asarray(smooth, dtype=np.float32) / 255.0
        else:  # soft low-contrast stripes
            frequency = rng.uniform(2.0, 6.0)
            weight = 0.5 + 0.5 * np.sin(2.0 * math.pi * frequency * u)
            second = first + 0.3 * (second - first)
        return first + weight[..., None] * (second - first)

    def _shape_mask(self, rng, shape):
        """(H, W) float32 coverage in [0, 1] of one shape with random size, position and a small rotation."""
        big = self.image_size * self.supersample
        radius = rng.uniform(0.30, 0.40)
        centre = 0.5 + rng.uniform(-0.08, 0.08, size=2)  # 0.48 - radius >= 0.08 keeps the whole shape inside
        angle = math.radians(rng.uniform(-15.0, 15.0))  # small: each class keeps its orientation
        cx, cy, r = centre[0] * big, centre[1] * big, radius * big
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        disc = lambda x, y, rad, fill: draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)
        if shape == "circle":
            disc(cx, cy, r, 255)
        elif shape == "ring":
            disc(cx, cy, r, 255)
            disc(cx, cy, 0.55 * r, 0)
        elif shape == "crescent":
            disc(cx, cy, r, 255)
            disc(cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle), 0.85 * r, 0)
        else:
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            points = _POLYGONS[shape] @ rotation.T * r + np.array([cx, cy])
            draw.polygon([tuple(p) for p in points], fill=255)
        if self.supersample > 1:
            mask = mask.reduce(self.supersample)  # box filter = exact pixel coverage -> anti-aliased edges
        return np.asarray(mask, dtype=np.float32) / 255.0

    @staticmethod
    def _shape_colour(rng, label):
        """Hue around a class centre (spacing 0.1, std 0.07: neighbours overlap), random saturation and value."""
        hue = (label / 10.0 + rng.normal(0.0, 0.07)) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)), dtype=np.float32)

    def _render(self, rng, shape):
        """(H, W, 3) uint8 image of `shape`."""
        label = SHAPE_CLASSES.index(shape)
        background = self._background(rng)
        colour = self._shape_colour(rng, label)
        for _ in range(8):  # keep the shape visible: its colour must differ clearly from the background's mean
            if np.abs(colour - background.mean(axis=(0, 1))).sum() > 0.6:
                break
            colour = self._shape_colour(rng, label)
        coverage = self._shape_mask(rng, shape)[..., None]
        image = background * (1.0 - coverage) + colour * coverage
        image = image + rng.normal(0.0, rng.uniform(0.0, 0.03), size=image.shape).astype(np.float32)
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively (.JPEG, .PNG, ...)


def _is_image_file(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _rgb(image):
    """PIL image -> RGB.  16-bit grayscale (modes I;16*, I) is scaled by 255/65535 (PIL's convert clips it at 255)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """root/<class_name>/<.png .jpg .jpeg files> -> (uint8 (3, S, S), label = index of the sorted class folder).

    Images should be S x S already (`python data.py prepare`); a few files are checked at start (DataError naming
    the prepare command), a wrong-sized file met later is center-cropped on the fly.  Any mode is converted to RGB.
    A corrupt file is reported once on stderr and replaced by the next readable item (i+1, i+2, ...).
    """

    def __init__(self, root, image_size):
        self.root, self.image_size = Path(root), int(image_size)
        self.prepare_hint = f"`python data.py prepare SRC DST --image-size {self.image_size}`"
        if not self.root.is_dir():
            raise DataError(f"data directory {self.root} does not exist or is not a directory "
                            f"(expected DIR/<class_name>/<images>)")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"data directory {self.root} has no class sub-folders; expected DIR/<class_name>/<images> "
                            f"(images of one class can go into a single sub-folder)")
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(e.name for e in os.scandir(self.root / name) if e.is_file() and _is_image_file(e.name))
            paths += [os.fsencode(os.path.join(name, f)) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise DataError(f"no images (.png, .jpg, .jpeg) found in the class folders of {self.root}")
        # numpy arrays rather than lists of str: DataLoader workers share them without copy-on-read
        self._paths, self._labels = np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)
        self._reported = set()
        self._check_sizes()

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self._paths)

    def path(self, i):
        return self.root / os.fsdecode(self._paths[i])

    def _check_sizes(self, samples=8):
        checked = np.unique(np.linspace(0, len(self) - 1, samples).round().astype(np.int64))
        unreadable = []
        for i in checked:
            try:
                with Image.open(self.path(i)) as im:
                    size = im.size
                    im.load()  # catches truncated files as well
            except Exception as error:
                unreadable.append(f"{self.path(i)} ({type(error).__name__})")
                continue
            if size != (self.image_size, self.image_size):
                raise DataError(f"images in {self.root} must be {self.image_size}x{self.image_size} but {self.path(i)} "
                                f"is {size[0]}x{size[1]}; preprocess the folder once with {self.prepare_hint}")
        if len(unreadable) == len(checked):
            raise DataError(f"none of the {len(checked)} images checked in {self.root} can be read, e.g. "
                            f"{unreadable[0]}; replace the corrupt files or prepare the folder again")

    def _report(self, i, message):
        if i not in self._reported:
            self._reported.add(i)
            print(f"warning: {self.path(i)}: {message}", file=sys.stderr, flush=True)

    def _read(self, i):
        with Image.open(self.path(i)) as im:
            im = _rgb(im)
        if im.size != (self.image_size, self.image_size):
            self._report(i, f"is {im.size[0]}x{im.size[1]}, center-cropping on the fly (run {self.prepare_hint} once)")
            im = adm_center_crop(im, self.image_size)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()

    def load_item(self, i):
        """-> (uint8 (3, S, S), label, number of corrupt files skipped to find a readable one)."""
        for skipped in range(len(self)):
            j = (i + skipped) % len(self)
            try:
                return self._read(j), int(self._labels[j]), skipped
            except Exception as error:  # PIL raises many types for broken files; a multi-day run must go on
                self._report(j, f"unreadable, skipped ({type(error).__name__}: {error})")
        raise DataError(f"none of the {len(self)} images in {self.root} can be read")

    def __getitem__(self, i):
        return self.load_item(i)[:2]


def load_item(dataset, i):
    """(uint8 image (3, H, W), label, corrupt files skipped) of item i of any (image, label) data set."""
    if hasattr(dataset, "load_item"):
        return dataset.load_item(i)
    image, label = dataset[i]
    return image, int(label), 0


def build_dataset(data_dir, image_size, split="train", seed=0, val_dir=None):
    """data_dir None -> EmbeddedShapes(split).  Otherwise an ImageFolder: train = DIR/train if it exists, else DIR;
    val = val_dir, else DIR/val when DIR/train and DIR/val exist (so no class may be called "train")."""
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'val'")
    if data_dir is None:
        return EmbeddedShapes(split=split, image_size=image_size, seed=seed)
    data_dir = Path(data_dir)
    split_layout = (data_dir / "train").is_dir()
    if split == "train":
        return ImageFolder(data_dir / "train" if split_layout else data_dir, image_size)
    if val_dir is not None:
        return ImageFolder(val_dir, image_size)
    if split_layout and (data_dir / "val").is_dir():
        return ImageFolder(data_dir / "val", image_size)
    raise DataError(f"no validation images for {data_dir}: pass a validation folder or use the layout "
                    f"{data_dir}/train/<class>/... + {data_dir}/val/<class>/...")


def identity(dataset):
    """What defines a data set for resume checks: its class names (or count) and image count, not its path."""
    return {"classes": list(getattr(dataset, "classes", None) or range(dataset.num_classes)), "images": len(dataset)}


def class_counts(dataset):
    """Images per class of an image folder (a list), or None where classes are equally likely (embedded data)."""
    labels = getattr(dataset, "_labels", None)
    return None if labels is None else np.bincount(labels, minlength=dataset.num_classes).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Training views (paper Tables 10 and 11)
# ---------------------------------------------------------------------------------------------------------------------

class _GaussianBlur:
    """MoCo v3's blur: PIL's Gaussian blur with sigma ~ U(sigma) pixels, drawn from torch's global RNG."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(torch.empty(()).uniform_(*self.sigma).item()))


@functools.lru_cache(maxsize=None)
def moco_views(height, width):
    """MoCo v3's two asymmetric views as torchvision transforms of PIL RGB images:
    RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) -> ColorJitter(0.4, 0.4, 0.2, 0.1) w.p. 0.8 -> grayscale w.p. 0.2
    -> Gaussian blur w.p. 1.0 / 0.1 -> solarize (threshold 128) w.p. 0 / 0.2 -> horizontal flip w.p. 0.5.
    Blur sigma is U(0.1, 2) pixels at 224 px, scaled with the image side (at 256 px up to 2.3 px)."""
    side = min(height, width)
    sigma = (0.1 * side / 224, 2.0 * side / 224)
    return tuple(v2.Compose([v2.RandomResizedCrop((height, width), scale=(0.08, 1.0)),
                             v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                             v2.RandomGrayscale(p=0.2),
                             v2.RandomApply([_GaussianBlur(sigma)], p=blur_p),
                             v2.RandomSolarize(128, p=solarize_p),
                             v2.RandomHorizontalFlip()])
                 for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)))


def augment(img, seed, views="pretrain", mode="simple"):
    """Normalised float32 (3, H, W) views of one uint8 (3, H, W) image; all randomness from `seed` alone.

    views="finetune": {"image"}: horizontal flip w.p. 0.5.  views="pretrain": {"clean": the same flip (consistency
    branch), "view1", "view2": the MoCo v3 views (contrastive branch)}.  torchvision draws from torch's global CPU
    RNG, so it is re-seeded here inside fork_rng, which restores the caller's state afterwards (only the CPU
    generator: torch.manual_seed would also re-seed every GPU's RNG, which the training loop draws its noise from).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        out = {"image" if views == "finetune" else "clean": v2.RandomHorizontalFlip()(img)}
        if views == "pretrain":
            pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
            for name, view in zip(("view1", "view2"), moco_views(*img.shape[1:])):
                out[name] = v2.functional.pil_to_tensor(view(pil))
    return {name: normalize(x.float() / 255.0, mode) for name, x in out.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The training stream
# ---------------------------------------------------------------------------------------------------------------------

def _step_positions(global_batch, rank, world, start_step):
    """Batch sampler: the global positions that rank `rank` of `world` reads at steps start_step, start_step + 1, ..."""
    size = global_batch // world
    for step in itertools.count(start_step):
        first = step * global_batch + rank * size
        yield list(range(first, first + size))


class _Samples(torch.utils.data.Dataset):
    """Global position p -> item order_e[p % n] of epoch e = p // n (order_e a permutation drawn from (seed, e)),
    augmented with seed (seed, p)."""

    def __init__(self, dataset, seed, views, mode):
        self.dataset, self.seed, self.views, self.mode = dataset, seed, views, mode
        self._epoch, self._order = None, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        epoch, offset = divmod(position, len(self.dataset))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, _TAG_PERMUTATION, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=generator)
        image, label, skipped = load_item(self.dataset, int(self._order[offset]))
        item = augment(image, _mix_seed(self.seed, _TAG_AUGMENT, position), self.views, self.mode)
        return {**item, "label": label, "num_corrupt": skipped}


class BatchStream:
    """Endless stream of training batches: the batch of step k depends only on (seed, k), whatever the number of
    processes or workers, and whether the run was resumed at start_step=k.

    Step k reads global positions k*B ... (k+1)*B-1 of a sequence of epochs (see _Samples); rank r of `world` gets
    the r-th of `world` equal slices.  Yields, b = global_batch // world:
      views="pretrain": {"clean", "view1", "view2": float (b, 3, H, W), "label": int64 (b,), "num_corrupt": int}
      views="finetune": {"image": float (b, 3, H, W), "label": int64 (b,), "num_corrupt": int}
    num_corrupt counts unreadable files replaced in the batch (summed in `.num_corrupt`).  `.step` is the step of the
    next batch: checkpoint it and pass it back as start_step.  Iterating again continues from `.step`.
    """

    def __init__(self, dataset, global_batch, rank=0, world=1, seed=0, views="finetune", mode="simple",
                 start_step=0, num_workers=0, pin_memory=False):
        if not isinstance(global_batch, int) or global_batch <= 0:
            raise DataError(f"global batch size must be a positive integer, got {global_batch!r}")
        if world <= 0 or not 0 <= rank < world:
            raise DataError(f"rank {rank} is not in a world of {world} processes")
        if global_batch % world != 0:
            raise DataError(f"global batch size {global_batch} is not divisible by the {world} processes; "
                            f"use a multiple of {world}")
        if views not in ("pretrain", "finetune"):
            raise DataError(f"unknown views {views!r}; choose 'pretrain' or 'finetune'")
        if mode not in NORMALIZATIONS:
            raise DataError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
        if len(dataset) == 0:
            raise DataError("the data set is empty")
        if seed < 0 or start_step < 0 or num_workers < 0:
            raise DataError("seed, start_step and num_workers must be >= 0")
        self.dataset, self.global_batch, self.rank, self.world = dataset, global_batch, rank, world
        self.seed, self.views, self.mode = int(seed), views, mode
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.step, self.num_corrupt = int(start_step), 0

    def __iter__(self):
        # an explicit generator: starting the loader must not draw from the global RNG (a resumed run would differ)
        loader = torch.utils.data.DataLoader(
            _Samples(self.dataset, self.seed, self.views, self.mode), num_workers=self.num_workers,
            batch_sampler=_step_positions(self.global_batch, self.rank, self.world, self.step),
            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            batch["num_corrupt"] = int(batch["num_corrupt"].sum())
            self.step += 1
            self.num_corrupt += batch["num_corrupt"]
            yield batch


# ---------------------------------------------------------------------------------------------------------------------
# Reference classifier of the embedded data set: class accuracy and FD_ref (NOT comparable to Inception FID)
# ---------------------------------------------------------------------------------------------------------------------

# Change CLASSIFIER_VERSION whenever the classifier or its training changes (it is the cache key).
CLASSIFIER_VERSION, CLASSIFIER_RESOLUTION = "v2", 32  # larger inputs are area-downsampled to 32x32
CLASSIFIER_TRAIN_IMAGES, CLASSIFIER_EPOCHS, CLASSIFIER_BATCH, CLASSIFIER_LR = 8000, 6, 128, 8e-3
METRIC_NAMES = {"fd_ref": "FD_ref (reference classifier, NOT comparable to Inception FID)",
                "class_acc": "Class accuracy", "val_acc": "Reference classifier val accuracy"}


def default_cache_dir():
    """$EPG_CACHE, else ~/.cache/epg."""
    return Path(os.environ.get("EPG_CACHE") or Path.home() / ".cache" / "epg")


class ReferenceClassifier(nn.Module):
    """Small CNN for the 10 shapes: images (N, 3, H, W) uint8 or float in [0, 1] -> (features (N, 128), logits).
    The features (global-average-pooled last conv layer) are what FD_ref compares."""

    def __init__(self, num_classes=10, feature_dim=128):
        super().__init__()
        block = lambda cin, cout, k=3: [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                                        nn.ReLU()]
        self.body = nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                                  nn.MaxPool2d(2), *block(64, feature_dim, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(feature_dim, num_classes)
        self.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPUs

    def forward(self, images):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if max(x.shape[-2:]) > CLASSIFIER_RESOLUTION:
            x = F.interpolate(x, size=(CLASSIFIER_RESOLUTION,) * 2, mode="area")
        features = self.body((2 * x - 1).contiguous(memory_format=torch.channels_last))
        return features, self.head(features)


def _embedded_split(split, image_size, length=None):
    dataset = EmbeddedShapes(split=split, image_size=image_size, length=length)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """uint8 (N, 3, H, W) -> (features (N, 128), logits (N, 10)), float32 on the CPU."""
    device = next(classifier.parameters()).device
    outputs = [classifier(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat([f for f, _ in outputs]).float().cpu(), torch.cat([l for _, l in outputs]).float().cpu()


def _gaussian(features):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), square roots from symmetric eigendecompositions."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    cross = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(0)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def train_reference_classifier(image_size, device="cpu"):
    """Deterministic short schedule (seeded init and order; random 90-degree rotations and flips, which keep every
    class) on one CPU thread (~20 s).  Returns the classifier in eval mode with val_acc, val_mu, val_sigma set."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)  # these small convolutions gain little from threads and stall on a busy machine
    try:
        images, labels = _embedded_split("train", image_size, CLASSIFIER_TRAIN_IMAGES)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)  # the CPU generator only (torch.manual_seed re-seeds GPUs too)
            classifier = ReferenceClassifier().to(device)
        generator = torch.Generator().manual_seed(0)
        steps = len(images) // CLASSIFIER_BATCH
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=CLASSIFIER_LR, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, CLASSIFIER_LR, pct_start=0.25,
                                                       total_steps=CLASSIFIER_EPOCHS * steps)
        classifier.train()
        for _ in range(CLASSIFIER_EPOCHS):
            order = torch.randperm(len(images), generator=generator)
            for step in range(steps):
                index = order[step * CLASSIFIER_BATCH:(step + 1) * CLASSIFIER_BATCH]
                x = torch.rot90(images[index], int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))
                if torch.rand(1, generator=generator).item() < 0.5:
                    x = x.flip(3)
                loss = F.cross_entropy(classifier(x.to(device))[1], labels[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        classifier.eval()
        val_images, val_labels = _embedded_split("val", image_size)
        features, logits = classify(classifier, val_images)
    finally:
        torch.set_num_threads(threads)
    classifier.image_size = image_size
    classifier.val_acc = (logits.argmax(1) == val_labels).double().mean().item()
    classifier.val_mu, classifier.val_sigma = _gaussian(features.numpy())
    return classifier


def reference_classifier(image_size, device="cpu", cache_dir=None):
    """The classifier for `image_size` (eval mode, on `device`), loaded from cache_dir (default_cache_dir()), else
    trained and cached there.  Attributes: image_size, val_acc, val_mu / val_sigma (the val split's features)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache_dir / f"reference_classifier_{CLASSIFIER_VERSION}_{int(image_size)}px.pt"
    classifier = ReferenceClassifier()
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            classifier.load_state_dict(saved["state_dict"])
            classifier.image_size, classifier.val_acc = saved["image_size"], saved["val_acc"]
            classifier.val_mu, classifier.val_sigma = saved["val_mu"].numpy(), saved["val_sigma"].numpy()
            return classifier.eval().to(device)
        except Exception as error:
            print(f"warning: ignoring unreadable cached classifier {path} ({type(error).__name__}); retraining",
                  file=sys.stderr)
    print(f"training the reference classifier for {image_size}x{image_size} embedded shapes (once; cached in "
          f"{cache_dir})", file=sys.stderr)
    classifier = train_reference_classifier(int(image_size), device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": classifier.state_dict(), "image_size": classifier.image_size,
                "val_acc": classifier.val_acc, "val_mu": torch.from_numpy(classifier.val_mu),
                "val_sigma": torch.from_numpy(classifier.val_sigma)}, temporary)
    os.replace(temporary, path)  # atomic: concurrent processes never read half a file
    return classifier


def embedded_metrics(images_uint8_nhwc, labels=None, image_size=None, device="cpu", cache_dir=None):
    """Reference-classifier metrics of images (N, H, W, 3) uint8 (numpy or tensor) of the embedded data set:
    {"fd_ref": Frechet distance of the classifier features to those of the val split, "class_acc": fraction
    classified as `labels` (only with labels), "val_acc": the classifier's own val accuracy (the best reachable)}.
    image_size: the classifier's (default: H; the images must have it)."""
    images = torch.as_tensor(np.array(images_uint8_nhwc))
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"the reference classifier needs uint8 images of shape (N, H, W, 3), got {images.dtype} "
                        f"{tuple(images.shape)}")
    if len(images) < 2:
        raise DataError(f"need at least 2 images for FD_ref, got {len(images)}")
    image_size = int(image_size or images.shape[1])
    if tuple(images.shape[1:3]) != (image_size, image_size) or image_size < 8:
        raise DataError(f"images are {images.shape[2]}x{images.shape[1]} but the reference classifier takes square "
                        f"images of the embedded data set's size (8 px or more; here {image_size})")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"need one integer label per image, got {labels.dtype} labels of shape {labels.shape} "
                            f"for {len(images)} images")
        if labels.min() < 0 or labels.max() >= len(SHAPE_CLASSES):
            raise DataError(f"labels must be classes 0..{len(SHAPE_CLASSES) - 1} of the embedded data set, got "
                            f"{labels.min()}..{labels.max()}")
    classifier = reference_classifier(image_size, device, cache_dir)
    features, logits = classify(classifier, images.permute(0, 3, 1, 2))
    mu, sigma = _gaussian(features.numpy())
    metrics = {"fd_ref": _frechet_distance(mu, sigma, classifier.val_mu, classifier.val_sigma)}
    if labels is not None:
        metrics["class_acc"] = (logits.argmax(1).numpy() == labels).mean().item()
    metrics["val_acc"] = classifier.val_acc
    return metrics


def score(path, device="cpu", cache_dir=None):
    """embedded_metrics of a sample npz: arr_0 images (N, H, W, 3) uint8, optional arr_1 labels (N,)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("arr_0", "arr_1") if key in npz.files}
    except Exception as error:
        raise DataError(f"cannot read {path} as an npz file ({type(error).__name__}: {error})") from None
    if "arr_0" not in arrays or arrays["arr_0"].size == 0:
        raise DataError(f"{path} holds no images (expected arr_0: N x H x W x 3 uint8, N >= 2)")
    metrics = embedded_metrics(arrays["arr_0"], arrays.get("arr_1"), device=device, cache_dir=cache_dir)
    if "arr_1" not in arrays:
        print("note: no labels (arr_1) in the npz, class accuracy skipped", file=sys.stderr)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# ADM center crop, data preparation, preview and the command line
# ---------------------------------------------------------------------------------------------------------------------

def adm_center_crop(pil_image, image_size):
    """ADM's center_crop_arr (the paper's preprocessing), PIL -> RGB PIL image_size x image_size: BOX-halve while
    the short side is >= 2 * image_size, BICUBIC-resize the short side to image_size, crop the center."""
    image = _rgb(pil_image)
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - image_size) // 2, (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _prepare_one(job):
    """(source, destination, image_size) -> (source, error message or None)."""
    source, destination, image_size = job
    try:
        with Image.open(source) as im:
            image = adm_center_crop(im, image_size)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name("." + destination.name + ".partial")  # never leave a half-written PNG
        image.save(partial, format="PNG", compress_level=0)
        os.replace(partial, destination)
        return source, None
    except Exception as error:
        return source, f"{type(error).__name__}: {error}"


def prepare(source_dir, destination_dir, image_size, workers=0):
    """ADM-center-crop every image under source_dir into destination_dir/<same sub-folders>/<same stem>.png
    (lossless, compress_level=0); existing outputs are skipped, so a rerun resumes.  -> (written, skipped, failed),
    failed a list of (path, error)."""
    from tqdm import tqdm
    source_dir, destination_dir = Path(source_dir), Path(destination_dir)
    if not source_dir.is_dir():
        raise DataError(f"source folder {source_dir} does not exist or is not a directory")
    if image_size <= 0:
        raise DataError(f"--image-size must be positive, got {image_size}")
    jobs, seen, skipped, failed = [], set(), 0, []
    for folder, subfolders, files in os.walk(source_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(f for f in files if _is_image_file(f)):
            source = Path(folder) / name
            destination = destination_dir / source.relative_to(source_dir).with_suffix(".png")
            if destination in seen:
                failed.append((source, f"another file already maps to {destination} (same stem)"))
            elif destination.exists():
                skipped += 1
            else:
                jobs.append((source, destination, image_size))
            seen.add(destination)
    if not jobs and not skipped and not failed:
        raise DataError(f"no images (.png, .jpg, .jpeg) found under {source_dir}")
    written, parallel = 0, workers > 0 and len(jobs) > 1
    with tqdm(total=len(jobs), desc=f"prepare {image_size}px", unit="img") as progress, \
            (multiprocessing.Pool(workers) if parallel else contextlib.nullcontext()) as pool:
        for source, error in pool.imap_unordered(_prepare_one, jobs, 16) if parallel else map(_prepare_one, jobs):
            if error is None:
                written += 1
            else:
                failed.append((source, error))
            progress.update(1)
    return written, skipped, failed


def preview(out, image_size=64, per_class=12, split="train", seed=0, padding=2):
    """Write a PNG grid of the embedded data set: one row per class, `per_class` examples per row."""
    dataset = EmbeddedShapes(split=split, image_size=image_size, seed=seed, length=per_class * len(SHAPE_CLASSES))
    step = image_size + padding
    grid = Image.new("RGB", (per_class * step + padding, dataset.num_classes * step + padding), (255, 255, 255))
    for label in range(dataset.num_classes):
        for k in range(per_class):
            image, _ = dataset[label + k * dataset.num_classes]
            grid.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (padding + k * step, padding + label * step))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description="EPG data tools: preprocess image folders, preview the embedded "
                                                 "data set, score samples of it with its reference classifier.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="ADM center crop a folder of images into lossless PNGs (run once)",
                            description="ADM center crop (the paper's preprocessing) of every image under SRC into "
                                        "DST/<same sub-folders>/<same stem>.png, lossless. Existing outputs are "
                                        "skipped, so rerunning resumes; unreadable inputs are reported and skipped.")
    p.add_argument("src", metavar="SRC", help="source folder, e.g. SRC/<class_name>/<image files>")
    p.add_argument("dst", metavar="DST", help="destination folder (created); keeps SRC's sub-folders and file stems")
    p.add_argument("--image-size", type=int, default=256, help="output side length in pixels (default: 256)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes; 0 = in this process (default: min(8, CPU count))")
    v = commands.add_parser("preview", help="write a PNG grid of the embedded data set (one row per class)")
    v.add_argument("--out", required=True, help="output PNG file")
    v.add_argument("--image-size", type=int, default=64, help="side length of each image in pixels (default: 64)")
    v.add_argument("--per-class", type=int, default=12, help="examples per class, i.e. columns (default: 12)")
    v.add_argument("--split", choices=tuple(_SPLITS), default="train", help="which split to show (default: train)")
    v.add_argument("--seed", type=int, default=0, help="data set seed (default: 0)")
    s = commands.add_parser("score", help="class accuracy and FD_ref of embedded-data-set samples",
                            description="Class accuracy and FD_ref of samples of the embedded shapes data set, with "
                                        "its reference classifier (trained once, cached). FD_ref is NOT comparable "
                                        "to Inception FID: use fid.py for ImageNet samples.")
    s.add_argument("samples", metavar="SAMPLES.npz", help="arr_0: images (N, H, W, 3) uint8; arr_1: labels (optional)")
    s.add_argument("--device", default="cpu", help="device of the classifier (default: cpu)")
    s.add_argument("--cache-dir", default=None, help="classifier cache (default: $EPG_CACHE, else ~/.cache/epg)")
    s.add_argument("--out", metavar="metrics.json", default=None, help="also write the metrics as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            written, skipped, failed = prepare(args.src, args.dst, args.image_size, args.workers)
            print(f"wrote {written} PNGs to {args.dst}, skipped {skipped} that already existed, {len(failed)} failed")
            for source, error in failed[:20]:
                print(f"warning: skipped {source}: {error}", file=sys.stderr)
            if len(failed) > 20:
                print(f"warning: ... and {len(failed) - 20} more unreadable inputs", file=sys.stderr)
        elif args.command == "preview":
            if args.image_size < 8 or args.per_class <= 0:
                raise DataError("--image-size must be >= 8 and --per-class positive")
            preview(args.out, args.image_size, args.per_class, args.split, args.seed)
            print(f"wrote {args.out}")
        else:
            metrics = score(args.samples, args.device, args.cache_dir)
            for name, value in metrics.items():
                print(f"{METRIC_NAMES[name]}: {value:.8g}")
            if args.out:
                Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

