"""The embedded data set: ten classes of shapes drawn in code (what a tiny run trains on without --data). Its
reference classifier, which judges samples of it, is evaluate.py's.

    python shapes.py preview --out grid.png [--image-size 32]      # one row per class
"""
import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import save_image

import rundir

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
            raise rundir.UserError(f"unknown split {split!r}; choose 'train' or 'val'")
        if int(image_size) < 8:
            raise rundir.UserError(f"image size {image_size} is too small for the embedded data set; use 8 or more")
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



def load_split(split, image_size, length=None, seed=0):
    """A whole split as tensors: images uint8 (N, 3, H, W), labels int64 (N,)."""
    dataset = EmbeddedShapes(split=split, image_size=image_size, length=length, seed=seed)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def preview(out, image_size=64, per_class=12, split="train", seed=0):
    """A PNG grid of the embedded data set: one row per class, `per_class` examples per row."""
    images, labels = load_split(split, image_size, per_class * len(SHAPE_CLASSES) * 3, seed)
    rows = torch.cat([images[labels == c][:per_class] for c in range(len(SHAPE_CLASSES))])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.float() / 255, out, nrow=per_class, padding=2, pad_value=1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Preview the embedded data set (scoring its samples: evaluate.py).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=["preview"], help="write a PNG grid (one row per class)")
    parser.add_argument("--out", required=True, help="output PNG file")
    parser.add_argument("--image-size", type=int, default=64, help="side length of each image in pixels")
    parser.add_argument("--per-class", type=int, default=12, help="examples per class, i.e. columns")
    parser.add_argument("--split", choices=tuple(SPLITS), default="train", help="which split to show")
    parser.add_argument("--seed", type=int, default=0, help="data set seed")
    args = parser.parse_args(argv)
    if args.image_size < 8 or args.per_class <= 0:
        raise rundir.UserError("--image-size must be >= 8 and --per-class positive")
    preview(args.out, args.image_size, args.per_class, args.split, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    rundir.cli_main(main)
