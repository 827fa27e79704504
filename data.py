"""The training data path of EPG: normalisation, image folders (ImageNet layout), MoCo v3 views, and a deterministic,
resumable, DDP-sharded batch stream; without --data, the embedded data set of shapes.py. Images travel as uint8
tensors (3, H, W) until the views turn them into normalised floats."""
import functools
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2
from torchvision.utils import save_image

import shapes
import rundir
import trainlib



# ---- Normalisation ----
NORMALIZATIONS = ("simple", "imagenet")
# model = (x01 - shift) / scale.  simple: 2x - 1 (EDM).  imagenet: the official code's std="imagenet", the ImageNet
# mean and *twice* the ImageNet std (per channel about zero mean, std 0.5 = sigma_data).
_SHIFT_SCALE = {"simple": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                "imagenet": ((0.485, 0.456, 0.406), (2 * 0.229, 2 * 0.224, 2 * 0.225))}


def _shift_scale(mode, like):
    if mode not in _SHIFT_SCALE:
        raise rundir.UserError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return (torch.tensor(v, dtype=dtype, device=like.device).view(3, 1, 1) for v in _SHIFT_SCALE[mode])


def normalize(x01, mode="simple"):
    """Float pixels in [0, 1] (..., 3, H, W) -> model space."""
    shift, scale = _shift_scale(mode, x01)
    return (x01 - shift) / scale


def denormalize(x, mode="simple"):
    """Exact inverse of ``normalize`` (no clamping)."""
    shift, scale = _shift_scale(mode, x)
    return x * scale + shift


def data_range(mode="simple"):
    """(normalize(0), normalize(1)), each (3,): the box the sampler clamps to."""
    return normalize(torch.zeros(3, 1, 1), mode).flatten(), normalize(torch.ones(3, 1, 1), mode).flatten()


def to_uint8_hwc(x, mode="simple"):
    """Model space (N, 3, H, W) -> uint8 numpy (N, H, W, 3): the one quantisation of saved samples and FID."""
    pixels = denormalize(x.detach().float(), mode).clamp(0.0, 1.0).mul(255.0).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path, columns):
    """uint8 images (N, H, W, 3) tiled into one PNG with white gaps, written atomically (a final grid ends a run)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0     # exact back to uint8
    rundir.write_atomically(path, lambda f: save_image(x, f, nrow=columns, padding=2, pad_value=1.0, format="PNG"))


def class_grid(images, labels, path, max_classes=10, per_class=10):
    """One row per class (the first `max_classes` present), up to `per_class` images each, blanks white."""
    rows = []
    for label in sorted(set(labels.tolist()))[:max_classes]:
        picked = list(np.flatnonzero(labels == label)[:per_class])
        rows += [images[k] for k in picked] + [np.full(images.shape[1:], 255, np.uint8)] * (per_class - len(picked))
    save_grid(np.stack(rows), path, per_class)


# ---- Image folders ----
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # matched case-insensitively (.JPEG, .PNG, ...)


def is_image_file(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _rgb(image):
    """PIL image -> RGB.  16-bit grayscale (modes I;16*, I) is scaled by 255/65535 (PIL's convert clips it at 255)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """root/<class_name>/<images> -> (uint8 (3, S, S), index of the sorted class folder), any mode made RGB. Images
    should be S x S already (tools/prepare.py): a few are checked at start, a wrong-sized one met later is
    center-cropped on the fly. A corrupt file is reported once and replaced by the next readable item (why not
    torchvision's ImageFolder: its first unreadable file would end a multi-day run)."""

    def __init__(self, root, image_size):
        self.root, self.image_size = Path(root), int(image_size)
        self.prepare_hint = f"`python tools/prepare.py SRC DST --image-size {self.image_size}`"
        if not self.root.is_dir():
            raise rundir.UserError(f"data directory {self.root} does not exist or is not a directory "
                                   f"(expected DIR/<class_name>/<images>)")
        paths, labels = [], []
        try:                                       # a symlink loop: ELOOP
            self.classes = sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir())
            for label, name in enumerate(self.classes):
                files = sorted(e.name for e in os.scandir(self.root / name) if is_image_file(e.name) and e.is_file())
                paths += [os.fsencode(os.path.join(name, f)) for f in files]
                labels += [label] * len(files)
        except OSError as e:
            raise rundir.UserError(f"cannot read {e.filename} ({e.strerror}); fix or remove it") from None
        self.num_classes = len(self.classes)
        if not self.classes:
            raise rundir.UserError(f"data directory {self.root} has no class sub-folders; expected "
                                   f"DIR/<class_name>/<images> (images of one class can go into a single sub-folder)")
        if not paths:
            raise rundir.UserError(f"no images (.png, .jpg, .jpeg) found in the class folders of {self.root}")
        counts = np.bincount(labels, minlength=self.num_classes)
        empty = [name for name, count in zip(self.classes, counts) if not count]
        if empty:
            raise rundir.UserError(f"class folders without images in {self.root}: {', '.join(empty)}; every "
                                   f"sub-folder is a class: remove them or add their images")
        # numpy arrays rather than lists of str: DataLoader workers share them without copy-on-read
        self._paths, self._labels = np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64)
        self._reported = set()
        self._check_sizes()

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
                raise rundir.UserError(f"images in {self.root} must be {self.image_size}x{self.image_size} but "
                                       f"{self.path(i)} is {size[0]}x{size[1]}; preprocess the folder once with "
                                       f"{self.prepare_hint}")
        if len(unreadable) == len(checked):
            raise rundir.UserError(f"none of the {len(checked)} images checked in {self.root} can be read, e.g. "
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
        """-> (image, label, corrupt files skipped to find a readable one)."""
        for skipped in range(len(self)):
            j = (i + skipped) % len(self)
            try:
                return self._read(j), int(self._labels[j]), skipped
            except Exception as error:  # PIL raises many types for broken files; a multi-day run must go on
                self._report(j, f"unreadable, skipped ({type(error).__name__}: {error})")
        raise rundir.UserError(f"none of the {len(self)} images in {self.root} can be read")

    def __getitem__(self, i):
        return self.load_item(i)[:2]


def load_item(dataset, i):
    """(image, label, corrupt files skipped) of item i of any (image, label) data set."""
    if hasattr(dataset, "load_item"):
        return dataset.load_item(i)
    image, label = dataset[i]
    return image, int(label), 0


def build_dataset(data_dir, image_size, split="train", seed=0):
    """data_dir None: EmbeddedShapes(split); else an ImageFolder: train = DIR/train if it exists, else DIR; val =
    DIR/val when DIR/train and DIR/val exist (so no class may be called "train")."""
    if split not in shapes.SPLITS:
        raise rundir.UserError(f"unknown split {split!r}; choose 'train' or 'val'")
    if data_dir is None:
        return shapes.EmbeddedShapes(split=split, image_size=image_size, seed=seed)
    data_dir = Path(data_dir)
    split_layout = (data_dir / "train").is_dir()
    if split == "train":
        return ImageFolder(data_dir / "train" if split_layout else data_dir, image_size)
    if split_layout and (data_dir / "val").is_dir():
        return ImageFolder(data_dir / "val", image_size)
    raise rundir.UserError(f"no validation images for {data_dir}: use the layout {data_dir}/train/<class>/... + "
                           f"{data_dir}/val/<class>/...")


def describe(dataset):
    """The data set as a start line names it: its source, image and class counts."""
    root = getattr(dataset, "root", None)
    source = f"image folder {root}" if root is not None else "the embedded shapes (shapes.py)"
    return f"data: {source}, {len(dataset)} images, {dataset.num_classes} classes"


def identity(dataset):
    """What defines a data set for resume checks: class names (or count) and image count, not its path."""
    return {"classes": list(getattr(dataset, "classes", None) or range(dataset.num_classes)), "images": len(dataset)}


def class_counts(dataset):
    """Images per class of an image folder, or None where classes are equally likely (embedded data)."""
    labels = getattr(dataset, "_labels", None)
    return None if labels is None else np.bincount(labels, minlength=dataset.num_classes).tolist()


# ---- Training views (paper Tables 10 and 11) ----
class _GaussianBlur:
    """MoCo v3's blur: PIL's Gaussian blur with sigma ~ U(sigma) pixels, drawn from torch's global RNG (why not
    torchvision's GaussianBlur: another filter, its kernel size fixed in advance; MoCo v3 and the authors use PIL's)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(torch.empty(()).uniform_(*self.sigma).item()))


@functools.lru_cache(maxsize=None)
def moco_views(height, width):
    """MoCo v3's two asymmetric views of PIL RGB images (they differ in blur and solarize). Blur sigma is U(0.1, 2)
    pixels, as MoCo v3 and the official code draw it at every size from 224 px up; below 224 px it shrinks with the
    image side (the tiny 32 px model: U(0.014, 0.29))."""
    scale = min(1.0, min(height, width) / 224)
    sigma = (0.1 * scale, 2.0 * scale)
    return tuple(v2.Compose([v2.RandomResizedCrop((height, width), scale=(0.08, 1.0)),
                             v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                             v2.RandomGrayscale(p=0.2),
                             v2.RandomApply([_GaussianBlur(sigma)], p=blur_p),
                             v2.RandomSolarize(128, p=solarize_p),
                             v2.RandomHorizontalFlip()])
                 for blur_p, solarize_p in ((1.0, 0.0), (0.1, 0.2)))


def augment(img, seed, views="pretrain", mode="simple"):
    """Normalised float32 views of one uint8 (3, H, W) image, all randomness from `seed`: finetune {"image": flipped
    w.p. 0.5}; pretrain {"clean": the same flip (consistency branch), "view1", "view2": MoCo v3's views}.
    torchvision draws from the global CPU RNG, so only that generator is re-seeded, inside fork_rng (torch.manual_seed
    would also re-seed the GPUs' RNG, which the training loop draws its noise from)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        out = {"image" if views == "finetune" else "clean": v2.RandomHorizontalFlip()(img)}
        if views == "pretrain":
            pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
            for name, view in zip(("view1", "view2"), moco_views(*img.shape[1:])):
                out[name] = v2.functional.pil_to_tensor(view(pil))
    return {name: normalize(x.float() / 255.0, mode) for name, x in out.items()}


# ---- The training stream ----
_TAG_PERMUTATION, _TAG_AUGMENT = 12, 13        # stream tags: different uses of one (seed, index) never share numbers


def _step_positions(global_batch, rank, world, start_step):
    """Batch sampler: the r-th of `world` slices of the global positions k*B ... (k+1)*B-1, steps k >= start_step
    (why not DistributedSampler: it cannot start at a step mid-epoch, and its batches depend on the world size)."""
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
            generator = torch.Generator().manual_seed(trainlib.mix_seed(self.seed, _TAG_PERMUTATION, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.dataset), generator=generator)
        image, label, skipped = load_item(self.dataset, int(self._order[offset]))
        item = augment(image, trainlib.mix_seed(self.seed, _TAG_AUGMENT, position), self.views, self.mode)
        return {**item, "label": label, "num_corrupt": skipped}


class BatchStream:
    """Endless stream of training batches: the batch of step k depends only on (seed, k) (_step_positions, _Samples),
    whatever the number of processes or workers, and whether the run was resumed at start_step=k. Yields dicts of
    (B/world, ...) tensors: "clean", "view1", "view2" (pretrain) or "image" (finetune), "label", and "num_corrupt", the
    number of unreadable files replaced (summed in `.num_corrupt`); `.step` is the step of the next batch."""

    def __init__(self, dataset, global_batch, rank=0, world=1, seed=0, views="finetune", mode="simple",
                 start_step=0, num_workers=0, pin_memory=False):
        if global_batch <= 0 or global_batch % world:          # the scripts' flags are checked before (trainlib)
            raise rundir.UserError(f"global batch size {global_batch} must be positive and divisible by the {world} "
                                   f"processes")
        if views not in ("pretrain", "finetune") or mode not in NORMALIZATIONS:
            raise rundir.UserError(f"unknown views {views!r} or normalization {mode!r}: choose pretrain or finetune, "
                                   f"and {' or '.join(NORMALIZATIONS)}")
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


# ---- ADM center crop, kNN probe images ----
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


def probe_sets(data_dir, image_size, mode, seed, bank_size, num_queries):
    """(bank, queries, noise) of a kNN probe, bank and queries (normalised images, labels): train images against the
    held-out split, or else a fixed fifth of the train images outside the bank; noise: fixed, of the queries' shape."""
    train = build_dataset(data_dir, image_size, "train", seed)
    try:
        held_out = build_dataset(data_dir, image_size, "val", seed)
    except rundir.UserError:
        held_out = None
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    if held_out is not None:
        queries = [(held_out, i) for i in torch.randperm(len(held_out), generator=g)[:num_queries].tolist()]
    else:
        queries, order = [(train, i) for i in order[:min(num_queries, len(train) // 5)]], order[len(train) // 5:]
    bank = [(train, i) for i in order[:bank_size]]
    if not queries or not bank:
        raise rundir.UserError(f"the kNN probe needs at least 5 training images, the data has {len(train)}; add "
                               f"images or pass --probe-every 0")

    def load(items):
        images, labels = zip(*(load_item(dataset, i)[:2] for dataset, i in items))
        return normalize(torch.stack(images).float() / 255.0, mode), torch.tensor(labels)

    bank, queries = load(bank), load(queries)
    return bank, queries, torch.randn(queries[0].shape, generator=g)
