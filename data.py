"""Data for EPG: normalisation, the embedded data set, image folders, augmentations and the training stream.

Everything that touches images before the model lives here, top to bottom:

1. Normalisation between [0, 1] pixels and model space (the paper's sigma_data = 0.5 convention).
2. ``EmbeddedShapes``: a procedurally drawn, class-labelled default data set, so every script runs without ImageNet.
3. ``ImageFolder``: ``root/<class_name>/<image files>`` of pre-cropped images (``python data.py prepare``).
4. Augmentations: the MoCo v3 views used by the contrastive loss in pre-training (paper Table 10) and the
   horizontal flip used by diffusion / consistency fine-tuning (paper Table 11).
5. ``BatchStream``: an infinite, deterministic, resumable, DDP-sharded stream of augmented batches.
6. The ADM center crop and the command line (``prepare`` and ``preview``).

Images travel as uint8 tensors of shape (3, H, W) until the augmentation turns them into normalised floats.
All augmentation randomness comes from an explicit ``torch.Generator`` seeded per sample, never the global RNG.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw


class DataError(Exception):
    """User-facing data problem; CLIs print str(e) and exit 2."""


# ----------------------------------------------------------------------------------------------------------------------
# 1. Normalisation
# ----------------------------------------------------------------------------------------------------------------------

NORMALIZATIONS = ("simple", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalization_constants(mode, like):
    """(shift, scale) with model = (x01 - shift) / scale; each of shape (3, 1, 1) on like's device and dtype."""
    if mode == "simple":  # EDM convention: x -> 2x - 1, i.e. [0, 1] -> [-1, 1]
        shift, scale = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    elif mode == "imagenet":  # the official code's std="imagenet": ImageNet mean, *twice* the ImageNet std
        shift, scale = IMAGENET_MEAN, tuple(2.0 * s for s in IMAGENET_STD)
    else:
        raise DataError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    as_tensor = lambda values: torch.tensor(values, dtype=dtype, device=like.device).view(3, 1, 1)
    return as_tensor(shift), as_tensor(scale)


def normalize(x01, mode="simple"):
    """Pixels in [0, 1] -> model space.  x01: float (..., 3, H, W).

    simple:   2 x - 1                        (range [-1, 1])
    imagenet: (x - mean_IN) / (2 std_IN)     (per channel about zero mean, std 0.5 = sigma_data)
    """
    shift, scale = _normalization_constants(mode, x01)
    return (x01 - shift) / scale


def denormalize(x, mode="simple"):
    """Exact inverse of ``normalize`` (no clamping).  x: float (..., 3, H, W) -> pixels (nominally [0, 1])."""
    shift, scale = _normalization_constants(mode, x)
    return x * scale + shift


def data_range(mode="simple"):
    """(lo, hi): float tensors of shape (3,) = normalize(0), normalize(1) per channel.

    The sampler clamps to this box, the valid normalised range of each channel.
    """
    zeros, ones = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
    return normalize(zeros, mode).flatten(), normalize(ones, mode).flatten()


def to_uint8_hwc(x, mode="simple"):
    """Model space (N, 3, H, W) -> uint8 numpy (N, H, W, 3): denormalize, clamp to [0, 1], * 255, round.

    The one quantisation used for saved samples and FID, so both see the same pixels.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    pixels = denormalize(x.detach().float(), mode).clamp(0.0, 1.0).mul(255.0).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _to_model_space(img_uint8, mode):
    """uint8 (3, H, W) -> normalised float32 (3, H, W)."""
    return normalize(img_uint8.to(torch.float32) / 255.0, mode)


def _mix_seed(*values):
    """Hash non-negative integers into one well-mixed 63-bit seed (NumPy's SeedSequence)."""
    words = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


# Stream tags, so that different uses of the same (seed, index) never share random numbers.
_TAG_SHAPES, _TAG_PERMUTATION, _TAG_AUGMENT = 11, 12, 13
_SPLITS = {"train": 0, "val": 1}


# ----------------------------------------------------------------------------------------------------------------------
# 2. Embedded data set: procedurally drawn shapes
# ----------------------------------------------------------------------------------------------------------------------

def _regular_polygon(corners, phase, radii=(1.0,)):
    """Unit polygon: `corners` vertices on circles of the given radii (cycled), first vertex at angle `phase`."""
    angles = phase + 2.0 * math.pi * np.arange(corners) / corners
    r = np.resize(np.asarray(radii, dtype=np.float64), corners)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _heart():
    """Classic parametric heart, centred and scaled to fit the unit disc (y points down, as in images)."""
    t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    points -= (points.max(0) + points.min(0)) / 2.0
    return points / np.linalg.norm(points, axis=1).max()


def _cross(half_width=0.3):
    w = half_width
    outline = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    return np.asarray(outline, dtype=np.float64) * 0.95


def _arrow():
    outline = [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)]
    return np.asarray(outline, dtype=np.float64)


# Polygons in unit coordinates (radius <= 1); circle, ring and crescent are drawn from discs instead.
_POLYGONS = {
    "square": _regular_polygon(4, math.pi / 4),
    "triangle": _regular_polygon(3, -math.pi / 2),
    "star": _regular_polygon(10, -math.pi / 2, radii=(1.0, 0.42)),
    "cross": _cross(),
    "hexagon": _regular_polygon(6, 0.0),
    "heart": _heart(),
    "arrow": _arrow(),
}
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart", "arrow", "crescent")


class EmbeddedShapes(torch.utils.data.Dataset):
    """Embedded default data set generated in code: deterministic per (seed, split, index), class-labelled.

    Item i shows one of 10 shapes (label = i % 10, so every prefix of 10 items is balanced) with a random colour
    (hue around a class-specific centre, overlapping between classes),
    size (radius 22-38 % of the image), position, rotation, background (flat colour, linear gradient, smooth colour
    noise or soft stripes) and a little pixel noise.  Shapes are drawn 4x (2x above 64 px) larger and box-downsampled,
    so edges are anti-aliased at every resolution; at 32x32 the classes stay recognisable.
    The train and val splits draw from different random streams (the split is part of the seed), so they differ.
    Returns (uint8 tensor (3, H, W), int label).
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
        """(H, W) float32 coverage in [0, 1] of one shape with random size, position and rotation."""
        big = self.image_size * self.supersample
        radius = rng.uniform(0.22, 0.38)
        slack = 0.48 - radius  # keeps the whole shape inside the image
        centre = 0.5 + rng.uniform(-slack, slack, size=2)
        angle = rng.uniform(0.0, 2.0 * math.pi)
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
        """Foreground colour: hue drawn around a class-specific centre (spacing 0.1, std 0.07, so neighbouring
        classes overlap), random saturation and value. Like natural images, low-level statistics correlate with the
        class without determining it; the shape is what defines it."""
        hue = (label / 10.0 + rng.normal(0.0, 0.07)) % 1.0
        saturation, value = rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
        sector = int(hue * 6.0) % 6
        f = hue * 6.0 - int(hue * 6.0)
        p, q, t = value * (1 - saturation), value * (1 - saturation * f), value * (1 - saturation * (1 - f))
        rgb = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][sector]
        return np.array(rgb, dtype=np.float32)

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


# ----------------------------------------------------------------------------------------------------------------------
# 3. Image folders
# ----------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively (.JPEG, .PNG, ...)


def _is_image_file(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _prepare_hint(image_size):
    return f"`python data.py prepare SRC DST --image-size {image_size}`"


class ImageFolder(torch.utils.data.Dataset):
    """root/<class_name>/<image files .png .jpg .jpeg .JPEG>, labels = index in sorted class-folder names.

    Images are expected to be image_size x image_size already (``python data.py prepare`` does the paper's ADM center
    crop once).  A few files spread over the folder are checked when the data set is built, and a DataError names
    the prepare command if they have the wrong size; a wrong-sized file met later is center-cropped on the fly.
    Grayscale, CMYK, RGBA and palette images are converted to RGB (PIL's convert, as ADM does; alpha is dropped).
    A corrupt or unreadable file never stops a run: it is reported once on stderr and replaced by the next readable
    item (deterministically: index i+1, i+2, ...); ``load_item`` returns how many were skipped, BatchStream counts it.
    Returns (uint8 tensor (3, image_size, image_size), int label).
    """

    def __init__(self, root, image_size):
        self.root, self.image_size = Path(root), int(image_size)
        if not self.root.exists():
            raise DataError(f"data directory {self.root} does not exist (expected DIR/<class_name>/<images>)")
        if not self.root.is_dir():
            raise DataError(f"data directory {self.root} is not a directory (expected DIR/<class_name>/<images>)")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DataError(f"data directory {self.root} has no class sub-folders; expected DIR/<class_name>/<images> "
                            f"(images of one class can go into a single sub-folder)")
        relative_paths, labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(e.name for e in os.scandir(self.root / name) if e.is_file() and _is_image_file(e.name))
            relative_paths += [os.fsencode(os.path.join(name, f)) for f in files]
            labels += [label] * len(files)
        if not relative_paths:
            raise DataError(f"no images (.png, .jpg, .jpeg) found in the class folders of {self.root}")
        # Compact numpy arrays rather than lists of str: DataLoader workers then share them without copy-on-read.
        self._paths = np.array(relative_paths, dtype=np.bytes_)
        self._labels = np.array(labels, dtype=np.int64)
        self._reported = set()  # files already reported as corrupt or wrong-sized in this process
        self._check_sizes()

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self._paths)

    def path(self, i):
        return self.root / os.fsdecode(self._paths[i])

    def _check_sizes(self, samples=8):
        expected = (self.image_size, self.image_size)
        checked = np.unique(np.linspace(0, len(self) - 1, samples).round().astype(np.int64))
        unreadable = []
        for i in checked:
            try:
                with Image.open(self.path(i)) as im:
                    size = im.size
                    im.load()  # decodes the pixels: catches truncated files as well
            except Exception as error:
                unreadable.append(f"{self.path(i)} ({type(error).__name__})")
                continue  # unreadable files are handled (skipped) when loading
            if size != expected:
                raise DataError(f"images in {self.root} must be {expected[0]}x{expected[1]} but {self.path(i)} is "
                                f"{size[0]}x{size[1]}; preprocess the folder once with {_prepare_hint(self.image_size)}")
        if len(unreadable) == len(checked):
            raise DataError(f"none of the {len(checked)} images checked in {self.root} can be read, e.g. "
                            f"{unreadable[0]}; replace the corrupt files or prepare the folder again with "
                            f"{_prepare_hint(self.image_size)}")

    def _report(self, i, message):
        if i not in self._reported:
            self._reported.add(i)
            print(f"warning: {self.path(i)}: {message}", file=sys.stderr, flush=True)

    def _read(self, i):
        """uint8 (3, S, S) of file i; raises on unreadable files."""
        with Image.open(self.path(i)) as im:
            im = im.convert("RGB")
        if im.size != (self.image_size, self.image_size):
            self._report(i, f"is {im.size[0]}x{im.size[1]}, center-cropping to {self.image_size} on the fly "
                            f"(run {_prepare_hint(self.image_size)} to do this once)")
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
        image, label, _ = self.load_item(i)
        return image, label


def build_dataset(data_dir, image_size, split="train", seed=0, val_dir=None):
    """The data set for a split.

    data_dir None -> EmbeddedShapes(split, image_size, seed).
    Otherwise an ImageFolder:
      split "train": DIR/train if that folder exists (layout DIR/train + DIR/val), else DIR itself.
      split "val":   val_dir if given, else DIR/val when DIR/train + DIR/val both exist; otherwise a DataError.
    (So a data set must not name a class "train".)
    """
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'val'")
    if data_dir is None:
        return EmbeddedShapes(split=split, image_size=image_size, seed=seed)
    data_dir = Path(data_dir)
    has_split_layout = (data_dir / "train").is_dir()
    if split == "train":
        return ImageFolder(data_dir / "train" if has_split_layout else data_dir, image_size)
    if val_dir is not None:
        return ImageFolder(val_dir, image_size)
    if has_split_layout and (data_dir / "val").is_dir():
        return ImageFolder(data_dir / "val", image_size)
    raise DataError(f"no validation images for {data_dir}: pass a validation folder or use the layout "
                    f"{data_dir}/train/<class>/... + {data_dir}/val/<class>/...")


def _load_item(dataset, i):
    """(uint8 image, label, corrupt files skipped) from any data set of this module (or a plain (image, label) one)."""
    if hasattr(dataset, "load_item"):
        return dataset.load_item(i)
    image, label = dataset[i]
    return image, int(label), 0


# ----------------------------------------------------------------------------------------------------------------------
# 4. Augmentations (uint8 (3, H, W) in; randomness only from the given generator)
# ----------------------------------------------------------------------------------------------------------------------

def _uniform(generator, low, high):
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(generator, p):
    """True with probability p."""
    return torch.rand((), generator=generator).item() < p


def _random_resized_crop_box(height, width, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of torchvision's RandomResizedCrop box: area fraction ~ U(scale), log aspect ~ U(log ratio),
    10 tries, then a center crop at the nearest allowed aspect ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _color_jitter(img, generator, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1): the four adjustments in a random order."""
    order = torch.randperm(4, generator=generator).tolist()
    factors = (_uniform(generator, 1 - brightness, 1 + brightness), _uniform(generator, 1 - contrast, 1 + contrast),
               _uniform(generator, 1 - saturation, 1 + saturation), _uniform(generator, -hue, hue))
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in order:
        img = adjust[k](img, factors[k])
    return img


def _blur_sigma(img, generator):
    """MoCo v3's GaussianBlur draws sigma ~ U[0.1, 2] pixels at 224 px (PIL radius = std).

    We scale sigma by image_size / 224 so the blur removes the same fraction of the image at every resolution
    (at 32 px it is nearly invisible, at 256 px sigma is up to 2.3 px).
    """
    return _uniform(generator, 0.1, 2.0) * min(img.shape[-2:]) / 224.0


def _gaussian_blur(img, sigma):
    """Separable Gaussian blur of uint8 (3, H, W) with reflected borders: taps at offsets -r..r, r = ceil(3 sigma).

    Same result as torchvision's gaussian_blur with a 2r+1 kernel (up to rounding), written as shifted sums: cheaper
    than a 2-D convolution at 256 px.  Taps below 1e-6 are dropped (tiny sigmas would otherwise give denormal floats).
    """
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).tolist()
    height, width = img.shape[-2:]
    padded = torch.nn.functional.pad(img.to(torch.float32)[None], (radius,) * 4, mode="reflect")[0]
    rows = sum(w * padded[:, :, k:k + width] for k, w in enumerate(weights) if w > 1e-6)  # blur along W
    blurred = sum(w * rows[:, k:k + height, :] for k, w in enumerate(weights) if w > 1e-6)  # then along H
    return blurred.round_().clamp_(0, 255).to(torch.uint8)


def _moco_view(img, generator, blur_p, solarize_p):
    """One MoCo v3 view (uint8 (3, H, W) -> uint8 (3, H, W)), in MoCo v3's order."""
    height, width = img.shape[-2:]
    top, left, h, w = _random_resized_crop_box(height, width, generator)
    img = TF.resized_crop(img, top, left, h, w, [height, width], antialias=True)
    if _chance(generator, 0.8):
        img = _color_jitter(img, generator)
    if _chance(generator, 0.2):
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _chance(generator, blur_p):
        img = _gaussian_blur(img, _blur_sigma(img, generator))
    if _chance(generator, solarize_p):
        img = TF.solarize(img, 128)  # PIL ImageOps.solarize: invert every value >= 128
    if _chance(generator, 0.5):
        img = TF.horizontal_flip(img)
    return img


def pretrain_views(img, generator, mode="simple"):
    """Inputs of one pre-training sample (paper Table 10, "Follow MoCo v3").

    img: uint8 (3, H, W).  Returns (clean, view1, view2), each float32 (3, H, W) normalised.
    clean (consistency branch): random horizontal flip only.
    view1 / view2 (contrastive branch), MoCo v3's asymmetric pipeline: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3)
    -> ColorJitter(0.4, 0.4, 0.2, 0.1) w.p. 0.8 -> grayscale w.p. 0.2 -> Gaussian blur w.p. 1.0 / 0.1
    -> solarize (threshold 128) w.p. 0 / 0.2 -> horizontal flip w.p. 0.5.
    """
    clean = TF.horizontal_flip(img) if _chance(generator, 0.5) else img
    view1 = _moco_view(img, generator, blur_p=1.0, solarize_p=0.0)
    view2 = _moco_view(img, generator, blur_p=0.1, solarize_p=0.2)
    return tuple(_to_model_space(v, mode) for v in (clean, view1, view2))


def finetune_view(img, generator, mode="simple"):
    """Fine-tuning input (paper Table 11: horizontal flip).  uint8 (3, H, W) -> normalised float32 (3, H, W)."""
    if _chance(generator, 0.5):
        img = TF.horizontal_flip(img)
    return _to_model_space(img, mode)


# ----------------------------------------------------------------------------------------------------------------------
# 5. The training stream
# ----------------------------------------------------------------------------------------------------------------------

class _PositionBatches:
    """Batch sampler: for step k = start_step, start_step + 1, ... the list of (global position, data set index)
    this rank reads.  Global position p lies in epoch p // n at offset p % n of that epoch's permutation."""

    def __init__(self, num_items, global_batch, rank, world, seed, start_step):
        self.num_items, self.global_batch, self.seed, self.start_step = num_items, global_batch, seed, start_step
        self.per_rank = global_batch // world
        self.rank_offset = rank * self.per_rank
        self._permutations = {}

    def _permutation(self, epoch):
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, _TAG_PERMUTATION, epoch))
            self._permutations[epoch] = torch.randperm(self.num_items, generator=generator).numpy()
        return self._permutations[epoch]

    def positions(self, step):
        first = step * self.global_batch + self.rank_offset
        return range(first, first + self.per_rank)

    def __iter__(self):
        step = self.start_step
        while True:
            batch = []
            for position in self.positions(step):
                epoch, offset = divmod(position, self.num_items)
                batch.append((position, int(self._permutation(epoch)[offset])))
            yield batch
            step += 1


class _AugmentedItems(torch.utils.data.Dataset):
    """Maps (global position, data set index) to one augmented sample; its generator is seeded by (seed, position)."""

    def __init__(self, dataset, seed, views, mode):
        self.dataset, self.seed, self.views, self.mode = dataset, seed, views, mode

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        position, index = key
        image, label, skipped = _load_item(self.dataset, index)
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, _TAG_AUGMENT, position))
        if self.views == "pretrain":
            clean, view1, view2 = pretrain_views(image, generator, self.mode)
            item = {"clean": clean, "view1": view1, "view2": view2}
        else:
            item = {"image": finetune_view(image, generator, self.mode)}
        item["label"], item["num_corrupt"] = label, skipped
        return item


def _collate(items):
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key not in ("label", "num_corrupt")}
    batch["label"] = torch.tensor([item["label"] for item in items], dtype=torch.int64)
    batch["num_corrupt"] = int(sum(item["num_corrupt"] for item in items))
    return batch


class BatchStream:
    """Infinite, deterministic, resumable, DDP-sharded stream of training batches.

    Step k consumes global positions k*B ... (k+1)*B-1 of an endless sequence of epochs, each epoch a permutation of the
    dataset drawn from (seed, epoch).  Rank r of `world` gets positions [r*B/world, (r+1)*B/world) of each step's slice.
    The augmentation generator of each sample is seeded from (seed, global position), so the data seen at step k is the
    same whatever the number of processes, number of workers, or whether the run was resumed at start_step=k.

    Yields dicts, b = global_batch // world:
      views="pretrain": {"clean", "view1", "view2": float (b, 3, H, W), "label": int64 (b,), "num_corrupt": int}
      views="finetune": {"image": float (b, 3, H, W), "label": int64 (b,), "num_corrupt": int}
    num_corrupt counts unreadable files replaced in this batch (also summed in `.num_corrupt`).
    `.step` is the step of the next batch to be yielded: checkpoint it and pass it back as start_step to resume.
    Iterating again continues from `.step`.
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
        self.batch_size = global_batch // world
        self.step = int(start_step)
        self.num_corrupt = 0

    def __iter__(self):
        sampler = _PositionBatches(len(self.dataset), self.global_batch, self.rank, self.world, self.seed, self.step)
        items = _AugmentedItems(self.dataset, self.seed, self.views, self.mode)
        workers = {"persistent_workers": True, "prefetch_factor": 2} if self.num_workers > 0 else {}
        # an explicit generator: creating the loader's iterator must not draw from the global RNG (that would make a
        # resumed run's first step differ from the uninterrupted one); augmentations are seeded per sample anyway
        loader = torch.utils.data.DataLoader(items, batch_sampler=sampler, num_workers=self.num_workers,
                                             collate_fn=_collate, pin_memory=self.pin_memory,
                                             generator=torch.Generator().manual_seed(self.seed), **workers)
        for batch in loader:
            self.step += 1
            self.num_corrupt += batch["num_corrupt"]
            yield batch


# ----------------------------------------------------------------------------------------------------------------------
# 6. ADM center crop, data preparation and preview (command line)
# ----------------------------------------------------------------------------------------------------------------------

def adm_center_crop(pil_image, image_size):
    """ADM's center_crop_arr, the paper's preprocessing: PIL image -> RGB PIL image of image_size x image_size.

    While the short side is >= 2 * image_size, BOX-downsample by 2 (cheap anti-aliasing); then BICUBIC-resize so the
    short side is image_size (long side rounded); then crop the center.
    """
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - image_size) // 2, (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _prepare_one(job):
    """Worker: (source, destination, image_size) -> (source, error message or None)."""
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
    """ADM-center-crop every image under source_dir into destination_dir as lossless PNG (compress_level=0),
    keeping the folder structure (class folders) and file stems.  Existing outputs are skipped, so a rerun resumes.
    Returns (written, skipped, failed) where failed is a list of (path, error)."""
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
                continue
            seen.add(destination)
            if destination.exists():
                skipped += 1
            else:
                jobs.append((source, destination, image_size))
    if not jobs and not skipped and not failed:
        raise DataError(f"no images (.png, .jpg, .jpeg) found under {source_dir}")
    failed_before_jobs = len(failed)
    with tqdm(total=len(jobs), desc=f"prepare {image_size}px", unit="img") as progress:
        if workers > 0 and len(jobs) > 1:
            import multiprocessing
            with multiprocessing.Pool(workers) as pool:
                results = pool.imap_unordered(_prepare_one, jobs, chunksize=16)
                for source, error in results:
                    if error is not None:
                        failed.append((source, error))
                    progress.update(1)
        else:
            for job in jobs:
                source, error = _prepare_one(job)
                if error is not None:
                    failed.append((source, error))
                progress.update(1)
    return len(jobs) - (len(failed) - failed_before_jobs), skipped, failed


def preview(out, image_size=64, per_class=12, split="train", seed=0, padding=2):
    """Write a PNG grid of the embedded data set: one row per class, `per_class` examples per row."""
    dataset = EmbeddedShapes(split=split, image_size=image_size, seed=seed, length=per_class * EmbeddedShapes.num_classes)
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
    parser = argparse.ArgumentParser(description="EPG data tools: preprocess image folders, preview the embedded data.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="ADM center crop a folder of images into lossless PNGs (run once)",
                            description="ADM center crop (the paper's preprocessing) of every image under SRC into "
                                        "DST/<same sub-folders>/<same stem>.png, lossless (compress_level=0). "
                                        "Outputs that already exist are skipped, so rerunning resumes; unreadable "
                                        "inputs are reported and skipped.")
    p.add_argument("src", metavar="SRC", help="source folder, e.g. SRC/<class_name>/<image files>")
    p.add_argument("dst", metavar="DST", help="destination folder (created); keeps SRC's sub-folders and file stems")
    p.add_argument("--image-size", type=int, default=256, help="output side length in pixels (default: 256)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes; 0 = in this process (default: min(8, CPU count))")
    v = commands.add_parser("preview", help="write a PNG grid of the embedded data set (one row per class)",
                            description="Write a PNG grid of the embedded shapes data set, one row per class.")
    v.add_argument("--out", required=True, help="output PNG file")
    v.add_argument("--image-size", type=int, default=64, help="side length of each image in pixels (default: 64)")
    v.add_argument("--per-class", type=int, default=12, help="examples per class, i.e. columns (default: 12)")
    v.add_argument("--split", choices=tuple(_SPLITS), default="train", help="which split to show (default: train)")
    v.add_argument("--seed", type=int, default=0, help="data set seed (default: 0)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            written, skipped, failed = prepare(args.src, args.dst, args.image_size, args.workers)
            print(f"wrote {written} PNGs to {args.dst}, skipped {skipped} that already existed, {len(failed)} failed")
            for source, error in failed[:20]:
                print(f"warning: skipped {source}: {error}", file=sys.stderr)
            if len(failed) > 20:
                print(f"warning: ... and {len(failed) - 20} more unreadable inputs", file=sys.stderr)
        else:
            if args.image_size < 8 or args.per_class <= 0:
                raise DataError("--image-size must be >= 8 and --per-class positive")
            preview(args.out, args.image_size, args.per_class, args.split, args.seed)
            print(f"wrote {args.out}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
