"""The embedded data set: ten classes of shapes drawn in code (what every script trains on without --data), its
reference classifier, and the two metrics a tiny run is judged by: class accuracy and FD_ref (a Frechet distance in
the classifier's feature space, NOT comparable to Inception FID).

    python shapes.py preview --out grid.png [--image-size 32]      # one row per class
    python shapes.py score SAMPLES.npz [--out metrics.json]        # class accuracy and FD_ref of samples
"""
import argparse
import colorsys
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import fid
import trainlib

DataError = trainlib.UserError
_TAG_SHAPES = 11
SPLITS = {"train": 0, "val": 1}


# ---- Embedded data set: procedurally drawn shapes ----
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


_CROSS = np.asarray([(0.3, 1), (0.3, 0.3), (1, 0.3), (1, -0.3), (0.3, -0.3), (0.3, -1), (-0.3, -1), (-0.3, -0.3),
                     (-1, -0.3), (-1, 0.3), (-0.3, 0.3), (-0.3, 1)]) * 0.95
_ARROW = np.asarray([(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)])
# Polygons in unit coordinates (radius <= 1); circle, ring and crescent are drawn from discs instead.
_POLYGONS = {"square": _regular_polygon(4, math.pi / 4), "triangle": _regular_polygon(3, -math.pi / 2),
             "star": _regular_polygon(10, -math.pi / 2, radii=(1.0, 0.42)), "cross": _CROSS,
             "hexagon": _regular_polygon(6, 0.0), "heart": _heart(), "arrow": _ARROW}
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart", "arrow", "crescent")


class EmbeddedShapes(torch.utils.data.Dataset):
    """The default data set, drawn in code, deterministic per (seed, split, index): item i -> (uint8 (3, H, W), label
    i % 10), its shape in a random colour, size, position and small rotation on a random background, with a little
    pixel noise. Shapes are drawn 4x (2x above 64 px) larger and box-downsampled (anti-aliased at every resolution)."""

    num_classes = 10
    classes = list(SHAPE_CLASSES)

    def __init__(self, split="train", image_size=32, seed=0, length=None):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose 'train' or 'val'")
        if int(image_size) < 8:
            raise DataError(f"image size {image_size} is too small for the embedded data set; use 8 or more")
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
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i, _TAG_SHAPES])
        image = self._render(rng, SHAPE_CLASSES[label])
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), label

    def _background(self, rng):
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


# ---- Reference classifier of the embedded data set: class accuracy and FD_ref (NOT comparable to Inception FID) ----
# Change CLASSIFIER_VERSION whenever the classifier or its training changes (it is the cache key).
CLASSIFIER_VERSION, CLASSIFIER_RESOLUTION = "v2", 32  # larger inputs are area-downsampled to 32x32
CLASSIFIER_TRAIN_IMAGES, CLASSIFIER_EPOCHS, CLASSIFIER_BATCH, CLASSIFIER_LR = 8000, 6, 128, 8e-3
METRIC_NAMES = {"fd_ref": "FD_ref (reference classifier, NOT comparable to Inception FID)",
                "class_acc": "Class accuracy", "val_acc": "Reference classifier val accuracy"}


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


def _embedded_split(split, image_size, length=None, seed=0):
    dataset = EmbeddedShapes(split=split, image_size=image_size, length=length, seed=seed)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """uint8 (N, 3, H, W) -> (features (N, 128), logits (N, 10)), float32 on the CPU."""
    device = next(classifier.parameters()).device
    outputs = [classifier(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
    return torch.cat([f for f, _ in outputs]).float().cpu(), torch.cat([l for _, l in outputs]).float().cpu()


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
    classifier.val_mu, classifier.val_sigma = fid.gaussian_statistics(features.numpy())
    return classifier


def reference_classifier(image_size, device="cpu", cache_dir=None):
    """The classifier for `image_size` (eval mode) from cache_dir ($EPG_CACHE, else ~/.cache/epg), else trained and
    cached there; with val_acc and val_mu / val_sigma of the val split's features."""
    cache_dir = Path(cache_dir or os.environ.get("EPG_CACHE") or Path.home() / ".cache" / "epg")
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
    saved = {"state_dict": classifier.state_dict(), "image_size": classifier.image_size, "val_acc": classifier.val_acc,
             "val_mu": torch.from_numpy(classifier.val_mu), "val_sigma": torch.from_numpy(classifier.val_sigma)}
    trainlib.write_atomically(path, lambda f: torch.save(saved, f))     # concurrent processes never read half a file
    return classifier


def embedded_metrics(images_uint8_nhwc, labels=None, image_size=None, device="cpu", cache_dir=None):
    """{"fd_ref": Frechet distance of the classifier features to the val split's, "class_acc": fraction classified
    as `labels` (given labels), "val_acc": the classifier's own (the best reachable)} of uint8 images (N, H, W, 3)."""
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
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"need one integer label per image, got {labels.dtype} labels of shape {labels.shape}")
    if labels is not None and (labels.min() < 0 or labels.max() >= len(SHAPE_CLASSES)):
        raise DataError(f"labels must be classes 0..9 of the embedded data set, got {labels.min()}..{labels.max()}")
    classifier = reference_classifier(image_size, device, cache_dir)
    features, logits = classify(classifier, images.permute(0, 3, 1, 2))
    mu, sigma = fid.gaussian_statistics(features.numpy())
    metrics = {"fd_ref": fid.frechet_distance(mu, sigma, classifier.val_mu, classifier.val_sigma)}
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


def preview(out, image_size=64, per_class=12, split="train", seed=0):
    """A PNG grid of the embedded data set: one row per class, `per_class` examples per row."""
    import data                                    # which imports this module
    images, labels = _embedded_split(split, image_size, per_class * len(SHAPE_CLASSES), seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    data.class_grid(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), out, len(SHAPE_CLASSES), per_class)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Preview the embedded data set, or score samples of it.")
    commands = parser.add_subparsers(dest="command", required=True)
    v = commands.add_parser("preview", help="write a PNG grid of the embedded data set (one row per class)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--out", required=True, help="output PNG file")
    v.add_argument("--image-size", type=int, default=64, help="side length of each image in pixels")
    v.add_argument("--per-class", type=int, default=12, help="examples per class, i.e. columns")
    v.add_argument("--split", choices=tuple(SPLITS), default="train", help="which split to show")
    v.add_argument("--seed", type=int, default=0, help="data set seed")
    s = commands.add_parser("score", help="class accuracy and FD_ref (NOT comparable to Inception FID: fid.py) of "
                                          "embedded-data-set samples, by the reference classifier (trained once)")
    s.add_argument("samples", metavar="SAMPLES.npz", help="arr_0: images (N, H, W, 3) uint8; arr_1: labels (optional)")
    s.add_argument("--device", default="cpu", help="device of the classifier (default: cpu)")
    s.add_argument("--cache-dir", default=None, help="classifier cache (default: $EPG_CACHE, else ~/.cache/epg)")
    s.add_argument("--out", metavar="metrics.json", default=None, help="also write the metrics as JSON")
    args = parser.parse_args(argv)
    if args.command == "preview":
        if args.image_size < 8 or args.per_class <= 0:
            raise DataError("--image-size must be >= 8 and --per-class positive")
        preview(args.out, args.image_size, args.per_class, args.split, args.seed)
        print(f"wrote {args.out}")
    else:
        if args.out:                               # before the work: the folder exists, takes a file, has room
            fid.check_destination(args.out, 4096)
        metrics = score(args.samples, args.device, args.cache_dir)
        for name, value in metrics.items():
            print(f"{METRIC_NAMES[name]}: {value:.8g}")
        if args.out:
            trainlib.write_json(args.out, metrics)


if __name__ == "__main__":
    trainlib.cli_main(main)
