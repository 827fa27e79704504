"""Tests for data.py: normalisation, image folders, augmentations, the batch stream, the ADM crop.

Every expectation comes from a closed form, a brute-force computation or an invariant, never from data.py's own output.
"""

import math
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import rundir  # noqa: E402
import shapes  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Per-image ops are tiny: intra-op threads only add overhead (and stall badly on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", data.NORMALIZATIONS)
def test_normalize_denormalize_are_inverse(mode):
    x = torch.rand(4, 3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(data.denormalize(data.normalize(x, mode), mode), x, rtol=0, atol=1e-12)
    y = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(data.normalize(data.denormalize(y, mode), mode), y, rtol=0, atol=1e-6)


def test_normalize_closed_forms():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(data.normalize(x, "simple"), 2 * x - 1)
    expected = (x.numpy() - MEAN[:, None, None]) / (2 * STD[:, None, None])
    np.testing.assert_allclose(data.normalize(x, "imagenet").numpy(), expected, atol=1e-12)
    # per channel: the ImageNet mean maps to 0 and mean + 2 std to 1 (zero mean, std 0.5 = sigma_data)
    mean_image = torch.tensor(MEAN).view(3, 1, 1).expand(3, 2, 2)
    np.testing.assert_allclose(data.normalize(mean_image, "imagenet").numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(data.normalize(mean_image + torch.tensor(2 * STD).view(3, 1, 1), "imagenet").numpy(),
                               1.0, atol=1e-12)
    with pytest.raises(rundir.UserError, match="simple"):
        data.normalize(x, "nope")


def test_data_range_closed_form():
    lo, hi = data.data_range("simple")
    assert lo.shape == hi.shape == (3,)
    np.testing.assert_allclose(lo.numpy(), -1.0)
    np.testing.assert_allclose(hi.numpy(), 1.0)
    lo, hi = data.data_range("imagenet")
    np.testing.assert_allclose(lo.numpy(), -MEAN / (2 * STD), rtol=1e-6)
    np.testing.assert_allclose(hi.numpy(), (1 - MEAN) / (2 * STD), rtol=1e-6)


@pytest.mark.parametrize("mode", data.NORMALIZATIONS)
def test_to_uint8_hwc_roundtrips_every_pixel_value_and_clamps(mode):
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([values, values[::-1], np.roll(values, 7)]).reshape(3, 16, 16)[None]  # (1, 3, 16, 16)
    x = data.normalize(torch.from_numpy(pixels).double() / 255.0, mode).float()
    out = data.to_uint8_hwc(x, mode)
    assert out.dtype == np.uint8 and out.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(out, pixels.transpose(0, 2, 3, 1))
    lo, hi = data.data_range(mode)
    beyond = torch.stack([lo - 1.0, hi + 1.0]).view(1, 2, 3).permute(0, 2, 1).unsqueeze(-1)  # (1, 3, 2, 1)
    np.testing.assert_array_equal(data.to_uint8_hwc(beyond, mode)[0, :, 0, :], [[0, 0, 0], [255, 255, 255]])


# ---------------------------------------------------------------------------------------------------------------------
# Embedded data set
# ---------------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------

def _make_folder(root, size=16):
    """classes 'apple' and 'bird' with RGB/gray/RGBA/CMYK/palette images and one corrupt file."""
    rng = np.random.default_rng(0)
    (root / "bird").mkdir(parents=True)
    (root / "apple").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "apple" / "a_rgb.png")
    Image.new("L", (size, size), 77).save(root / "apple" / "b_gray.jpg", quality=100)
    Image.new("RGBA", (size, size), (10, 200, 30, 0)).save(root / "apple" / "c_rgba.png")
    (root / "apple" / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.new("CMYK", (size, size), (0, 0, 0, 0)).save(root / "bird" / "e_cmyk.JPEG", quality=100)
    palette = Image.new("P", (size, size), 1)
    palette.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    palette.save(root / "bird" / "f_palette.png")
    (root / "bird" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labels_modes_and_corrupt_files(tmp_path, capsys):
    folder = data.ImageFolder(_make_folder(tmp_path / "imgs"), 16)
    assert folder.classes == ["apple", "bird"] and folder.num_classes == 2
    assert len(folder) == 6
    names = [folder.path(i).name for i in range(len(folder))]
    assert names == ["a_rgb.png", "b_gray.jpg", "c_rgba.png", "d_corrupt.png", "e_cmyk.JPEG", "f_palette.png"]
    labels = [folder[i][1] for i in range(len(folder))]
    assert labels == [0, 0, 0, 1, 1, 1]  # the corrupt item (3) is replaced by the next one, a bird
    for i in range(len(folder)):
        image, _ = folder[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    gray = folder[1][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and abs(gray.float().mean() - 77) < 2
    assert torch.equal(folder[2][0][:, 0, 0], torch.tensor([10, 200, 30], dtype=torch.uint8))
    assert (folder[4][0].float().mean() > 250)  # CMYK (0, 0, 0, 0) is white
    assert torch.equal(folder[5][0][:, 0, 0], torch.tensor([250, 20, 20], dtype=torch.uint8))
    image, label, skipped = folder.load_item(3)
    assert skipped == 1 and label == 1 and torch.equal(image, folder[4][0])
    assert folder.load_item(0)[2] == 0
    assert "d_corrupt.png" in capsys.readouterr().err


def test_16_bit_grayscale_pngs_keep_their_values(tmp_path):
    """A 16-bit PNG (PIL mode I;16) scales by 255/65535: 65535 -> 255, 32768 -> round(127.502) = 128, 0 -> 0 (PIL's
    own convert("RGB") would clip everything above 255 to white)."""
    values = np.full((16, 16), 32768, dtype=np.uint16)
    values[0], values[1] = 65535, 0
    (tmp_path / "folder" / "grey").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "folder" / "grey" / "a.png")
    with Image.open(tmp_path / "folder" / "grey" / "a.png") as im:
        assert im.mode == "I;16"
    expected = np.full((3, 16, 16), 128, dtype=np.uint8)
    expected[:, 0], expected[:, 1] = 255, 0
    image, _ = data.ImageFolder(tmp_path / "folder", 16)[0]
    np.testing.assert_array_equal(image.numpy(), expected)


def test_batch_stream_counts_corrupt_files(tmp_path):
    folder = data.ImageFolder(_make_folder(tmp_path / "imgs"), 16)
    stream = data.BatchStream(folder, global_batch=6, views="pretrain")
    batch = next(iter(stream))  # one step = one epoch: each index exactly once, the corrupt one included
    assert batch["num_corrupt"] == 1 and stream.num_corrupt == 1
    assert batch["view1"].shape == (6, 3, 16, 16) and batch["label"].dtype == torch.int64


def test_image_folder_errors(tmp_path):
    with pytest.raises(rundir.UserError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(rundir.UserError, match="no class sub-folders"):
        data.ImageFolder(tmp_path / "empty", 16)
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    (tmp_path / "no_images" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(rundir.UserError, match="no images"):
        data.ImageFolder(tmp_path / "no_images", 16)
    (tmp_path / "big" / "cls").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "big" / "cls" / "x.png")
    with pytest.raises(rundir.UserError, match="python tools/prepare.py"):
        data.ImageFolder(tmp_path / "big", 16)


def test_build_dataset(tmp_path):
    assert isinstance(data.build_dataset(None, 32), shapes.EmbeddedShapes)
    assert data.build_dataset(None, 32, split="val").split == "val"
    for split in ("train", "val"):
        (tmp_path / "layout" / split / "cls").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "layout" / split / "cls" / "x.png")
    assert data.build_dataset(tmp_path / "layout", 8).root == tmp_path / "layout" / "train"
    assert data.build_dataset(tmp_path / "layout", 8, split="val").root == tmp_path / "layout" / "val"
    flat = tmp_path / "layout" / "train"
    assert data.build_dataset(flat, 8).root == flat
    with pytest.raises(rundir.UserError, match="validation"):
        data.build_dataset(flat, 8, split="val")


# ---------------------------------------------------------------------------------------------------------------------
# Training views
# ---------------------------------------------------------------------------------------------------------------------

def _colourful(size=32):
    return shapes.EmbeddedShapes(image_size=size)[3][0]


def _uint8(view):
    return torch.from_numpy(data.to_uint8_hwc(view[None])[0]).permute(2, 0, 1)


@pytest.mark.parametrize("mode", data.NORMALIZATIONS)
def test_views_shapes_ranges_and_determinism(mode):
    img = _colourful()
    lo, hi = (t.view(3, 1, 1) for t in data.data_range(mode))
    global_state = torch.get_rng_state()
    views = data.augment(img, 5, "pretrain", mode)
    assert torch.equal(torch.get_rng_state(), global_state)  # the caller's RNG is left as it was
    assert set(views) == {"clean", "view1", "view2"}
    for v in views.values():
        assert v.dtype == torch.float32 and v.shape == (3, 32, 32)
        assert (v >= lo - 1e-6).all() and (v <= hi + 1e-6).all()
    torch.manual_seed(1234)  # a sample's views depend on its seed only, not on the global RNG state
    again = data.augment(img, 5, "pretrain", mode)
    assert all(torch.equal(views[k], again[k]) for k in views)
    assert not torch.equal(views["view1"], data.augment(img, 6, "pretrain", mode)["view1"])
    original01 = img.double() / 255
    for clean in (views["clean"], data.augment(img, 1, "finetune", mode)["image"]):
        clean01 = data.denormalize(clean, mode).double()
        assert torch.allclose(clean01, original01, atol=1e-6) or torch.allclose(clean01, original01.flip(-1), atol=1e-6)
    assert all(v.shape == (3, 256, 256) for v in data.augment(shapes.EmbeddedShapes(image_size=256)[0][0], 0).values())


def test_views_touch_no_other_random_state(monkeypatch):
    """Only torch's CPU generator is re-seeded (and restored): torch.manual_seed would also re-seed every GPU, whose
    RNG gives the training loop its noise; Python's and NumPy's global states stay as they were."""
    def reseeded(*args, **kwargs):
        raise AssertionError("a GPU random generator was re-seeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded)
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    data.augment(_colourful(), 0, "pretrain")
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state)


def test_finetune_flip_probability():
    img = _colourful()
    flips = sum(not torch.equal(data.augment(img, s, "finetune")["image"], data.normalize(img / 255.0))
                for s in range(400))
    assert 160 < flips < 240  # 0.5 +- 4 standard deviations


def test_moco_views_of_a_uniform_image():
    """On a uniform light-grey image (250) every operation but colour jitter and solarization is invisible, so:
    a view differs from 250 iff it was jittered (MoCo v3: p 0.8; brightness factor in [0.6, 1.4] -> values 150-255),
    and it is below 128 iff it was solarized (threshold 128: 255 - v <= 105; MoCo v3: view 1 never, view 2 p 0.2)."""
    img, draws = torch.full((3, 16, 16), 250, dtype=torch.uint8), 1000
    jittered, solarized, plain_values = Counter(), Counter(), []
    for seed in range(draws):
        views = data.augment(img, seed, "pretrain")
        for name in ("view1", "view2"):
            pixels = _uint8(views[name])
            assert (pixels == pixels[0, 0, 0]).all()  # still uniform (and grey)
            value = int(pixels[0, 0, 0])
            solarized[name] += value < 128
            if value >= 128:
                jittered[name] += value != 250
                plain_values.append(value)
    assert solarized["view1"] == 0
    assert abs(solarized["view2"] / draws - 0.2) < 4 * math.sqrt(0.2 * 0.8 / draws)
    assert abs(jittered["view1"] / draws - 0.8) < 4 * math.sqrt(0.2 * 0.8 / draws)
    assert abs(jittered["view2"] / (draws - solarized["view2"]) - 0.8) < 4 * math.sqrt(0.2 * 0.8 / (0.8 * draws))
    assert 149 <= min(plain_values) < 160  # darkest brightness factor 0.6 (250 * 0.6 = 150), up to rounding


def test_grayscale_views_are_gray_at_the_expected_rate():
    img, draws, gray = _colourful(32), 500, Counter()
    for seed in range(draws):
        views = data.augment(img, seed, "pretrain")
        for name in ("view1", "view2"):
            pixels = _uint8(views[name])
            gray[name] += bool(torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2]))
    for name in ("view1", "view2"):
        assert abs(gray[name] / draws - 0.2) < 4 * math.sqrt(0.16 / draws)


def test_blur_is_a_gaussian_of_the_drawn_sigma():
    """MoCo v3 blurs with PIL's Gaussian blur, radius = standard deviation: the blurred profile of a thin line has
    standard deviation sigma, and sigma is drawn uniformly from the given range."""
    line = np.zeros((5, 129, 3), dtype=np.uint8)
    line[:, 64] = 255
    x = np.arange(129) - 64
    measured = []
    for seed in range(40):
        torch.manual_seed(seed)
        profile = np.asarray(data._GaussianBlur((0.5, 2.0))(Image.fromarray(line)))[2, :, 0].astype(np.float64)
        measured.append(math.sqrt((profile * x ** 2).sum() / profile.sum()))
    assert 0.45 < min(measured) < 0.8 and 1.7 < max(measured) < 2.1
# ---------------------------------------------------------------------------------------------------------------------
# Batch stream
# ---------------------------------------------------------------------------------------------------------------------

class IndexImages(torch.utils.data.Dataset):
    """Item i is an image whose pixels encode i (so batches reveal which items they hold) with label i % 3."""

    def __init__(self, n, size=8):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        image[0], image[1] = i % 256, i // 256
        image[2, :, : self.size // 2] = 255  # left half marked, so a flip is visible
        return image, i % 3


def _take(stream, steps):
    iterator = iter(stream)
    return [next(iterator) for _ in range(steps)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_batch_stream_every_item_once_per_epoch():
    n, batch = 24, 6
    stream = data.BatchStream(IndexImages(n), global_batch=batch, views="finetune")
    seen = []
    for step in _take(stream, 3 * n // batch):
        pixels = data.to_uint8_hwc(step["image"])
        seen += (pixels[:, 0, 0, 0].astype(int) + 256 * pixels[:, 0, 0, 1].astype(int)).tolist()
    epochs = [seen[k * n:(k + 1) * n] for k in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]  # a fresh permutation each epoch
    assert stream.step == 3 * n // batch


@pytest.mark.parametrize("views", ["pretrain", "finetune"])
def test_batch_stream_ranks_concatenate_to_single_process(views):
    dataset = shapes.EmbeddedShapes(image_size=16, length=50)
    single = _take(data.BatchStream(dataset, 8, views=views, seed=3), 4)
    ranks = [_take(data.BatchStream(dataset, 8, rank=r, world=2, views=views, seed=3), 4) for r in range(2)]
    for step in range(4):
        for key in single[step]:
            if key == "num_corrupt":
                continue
            assert ranks[0][step][key].shape[0] == 4
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), single[step][key]), key


def test_batch_stream_resume_matches_uninterrupted():
    dataset = shapes.EmbeddedShapes(image_size=16, length=20)  # 7-item batches cross epoch boundaries
    full = _take(data.BatchStream(dataset, 7, views="pretrain", seed=1), 6)
    resumed = _take(data.BatchStream(dataset, 7, views="pretrain", seed=1, start_step=4), 2)
    _assert_same_batches(full[4:], resumed)
    stream = data.BatchStream(dataset, 7, views="pretrain", seed=1)
    _take(stream, 3)
    assert stream.step == 3
    _assert_same_batches(full[3:5], _take(stream, 2))  # iterating again continues from .step
    other_seed = _take(data.BatchStream(dataset, 7, views="pretrain", seed=2), 1)[0]
    assert not torch.equal(other_seed["view1"], full[0]["view1"])


def test_batch_stream_draws_fresh_views_for_every_reading():
    """One item read 4 times in a step (4 epochs of a 1-item data set): 4 different pairs of views, not one reused."""
    batch = _take(data.BatchStream(shapes.EmbeddedShapes(image_size=16, length=1), 4, views="pretrain"), 1)[0]
    for key in ("view1", "view2"):
        assert len({bytes(data.to_uint8_hwc(v[None])) for v in batch[key]}) == 4


def test_batch_stream_workers_match_in_process():
    dataset = shapes.EmbeddedShapes(image_size=16, length=40)
    in_process = _take(data.BatchStream(dataset, 8, views="pretrain", seed=4), 5)
    with_workers = _take(data.BatchStream(dataset, 8, views="pretrain", seed=4, num_workers=2), 5)
    _assert_same_batches(in_process, with_workers)


def test_batch_stream_validation():
    dataset = shapes.EmbeddedShapes(image_size=16, length=10)
    with pytest.raises(rundir.UserError, match="divisible"):
        data.BatchStream(dataset, 10, world=3)
    with pytest.raises(rundir.UserError, match="positive"):
        data.BatchStream(dataset, 0)
    with pytest.raises(rundir.UserError, match="views"):
        data.BatchStream(dataset, 4, views="both")


def test_batch_stream_does_not_touch_global_rng():
    # a resumed run creates a fresh stream; if that drew from the global RNG, its first step would differ
    ds = shapes.EmbeddedShapes("train", 16, length=40)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(iter(data.BatchStream(ds, 8, views="finetune")))
    assert torch.equal(torch.rand(3), expected)
