"""fid.py against its peers (pytorch-fid, torch-fidelity), closed forms and brute force.

No test needs the real Inception weights: a randomly initialised Inception-v3 in the pt_inception key layout is
saved to a file and loaded by fid.py and by the peers. With random weights the numbers mean nothing, but the two
implementations must still agree to float precision, layer by layer.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy import linalg

import fid
import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: random Inception weights, a few images, pytorch-fid's features of them
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """(path, state dict) of a random FID Inception in the pt_inception layout: torchvision's Inception3 with 1008
    classes and no aux head has exactly pytorch-fid's keys. He-initialised convolutions and perturbed BatchNorm
    statistics keep the activations O(1) through all 94 layers, so relative comparisons are meaningful."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    generator = torch.Generator().manual_seed(0)
    state = net.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name.endswith("conv.weight"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2 / tensor[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith(("bn.bias", "running_mean")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(0.8 + 0.4 * torch.rand(tensor.shape, generator=generator))
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(state, path)
    return path, state


def load_test_inception(path, resize):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # "sha256 is not 6726825d": expected for test weights
        return fid.load_inception(path, resize=resize)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 random 32x32 RGB PNGs (uint8 (3, 32, 32, 3) returned too). Inception at 299x299 is slow on a CPU."""
    folder = tmp_path_factory.mktemp("images")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder, images


@pytest.fixture(scope="module")
def pytorch_fid_features(random_inception, image_folder):
    """pytorch-fid's pool_3 features of the image folder (its own PNG loading, ToTensor, resize and model), and the
    sFID layer (mixed_6/conv = Mixed_6d.branch1x1, channels [:7], NHWC-flattened) captured by a forward hook."""
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    path, state = random_inception
    with pytest.MonkeyPatch.context() as patch:          # pytorch-fid would download its weights: hand it ours
        patch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
        model = pytorch_fid.inception.InceptionV3([3]).eval()
    mixed_6d = model.blocks[2][6]                          # block 2 = Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
    spatial = []
    mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: spatial.append(output[:, :7].permute(0, 2, 3, 1).flatten(1).numpy()))
    files = sorted(image_folder[0].glob("*.png"))
    pool = pytorch_fid.fid_score.get_activations(files, model, batch_size=len(files), num_workers=0)
    return {"pool": pool, "spatial": np.concatenate(spatial)}


# ----------------------------------------------------------------------------------------------------------------
# The network against pytorch-fid (pytorch-fid resize) and torch-fidelity (TF resize)
# ----------------------------------------------------------------------------------------------------------------
def test_features_match_pytorch_fid(random_inception, image_folder, pytorch_fid_features):
    model = load_test_inception(random_inception[0], "pytorch-fid")
    ours = fid.extract_features(model, fid.FolderImages(image_folder[0]), batch_size=2, progress=False)
    assert ours["pool"].shape == (3, 2048) and ours["spatial"].shape == (3, 2023) and ours["logits"].shape == (3, 1008)
    assert np.abs(pytorch_fid_features["pool"]).mean() > 0.01           # the random network is not degenerate
    assert relative_error(ours["pool"], pytorch_fid_features["pool"]) <= 1e-4
    assert relative_error(ours["spatial"], pytorch_fid_features["spatial"]) <= 1e-4


def test_features_match_torch_fidelity(random_inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    peer = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(random_inception[0]))
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 3, 24, 40), dtype=np.uint8))
    with torch.no_grad():
        pool, logits = peer(images)
        ours = load_test_inception(random_inception[0], "tf")(images)
    assert relative_error(ours["pool"], pool) <= 1e-4
    assert relative_error(ours["logits"], logits) <= 1e-4          # ADM's IS logits: pool_3 @ W, no bias


@pytest.mark.parametrize("height,width", [(32, 32), (17, 45), (64, 64), (299, 299), (333, 310)])
def test_tf1_resize_equals_torch_fidelity(height, width):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    images = torch.from_numpy(np.random.default_rng(height).integers(0, 256, (2, 3, height, width), dtype=np.uint8))
    ours = fid.resize_bilinear_tf1(images.float(), 299)
    peer = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    assert ours.shape == (2, 3, 299, 299)
    assert torch.equal(ours, peer)                                 # bit-exact on the CPU


def test_tf1_resize_of_a_ramp_samples_at_i_times_in_over_out():
    # TF1 (align_corners=False, no half-pixel centres) samples output pixel i at src = i * in / out, clamped at the
    # last input pixel; a linear ramp is reproduced exactly there.
    width = 10
    ramp = torch.arange(width, dtype=torch.float32).expand(1, 1, 3, width)
    out = fid.resize_bilinear_tf1(ramp, 25)[0, 0, 0]
    expected = np.minimum(np.arange(25) * width / 25, width - 1)
    assert np.allclose(out.numpy(), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The command line: --save-stats equals pytorch-fid, in one process and sharded over two (torchrun, gloo)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_stats(random_inception, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "stats.npz"
    result = subprocess.run([sys.executable, "fid.py", str(image_folder[0]), "--save-stats", str(out),
                             "--inception", str(random_inception[0]), "--resize", "pytorch-fid", "--batch-size", "2",
                             "--device", "cpu", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def test_save_stats_cli_equals_pytorch_fid(saved_stats, pytorch_fid_features):
    with np.load(saved_stats) as stats:
        assert str(stats["resize"]) == "pytorch-fid"
        pool, spatial = pytorch_fid_features["pool"], pytorch_fid_features["spatial"]
        assert relative_error(stats["pool_features"], pool) <= 1e-4
        # pytorch-fid's calculate_activation_statistics: np.mean, np.cov(rowvar=False) (unbiased)
        assert relative_error(stats["mu"], pool.mean(0)) <= 1e-4
        assert relative_error(stats["sigma"], np.cov(pool, rowvar=False)) <= 1e-4
        assert relative_error(stats["mu_s"], spatial.mean(0)) <= 1e-4
        assert relative_error(stats["sigma_s"], np.cov(spatial, rowvar=False)) <= 1e-4
        assert stats["logits"].shape == (3, 1008) and stats["mu"].dtype == np.float64


def test_torchrun_sharded_features_equal_single_process(run_torchrun, saved_stats, random_inception, image_folder,
                                                        tmp_path):
    # 3 images over 2 ranks: blocks of 2 and 1, gathered in order. Other batch compositions and thread counts
    # change the float32 rounding of the convolutions, hence a tolerance rather than bitwise equality.
    out = tmp_path / "sharded.npz"
    result = run_torchrun(2, "fid.py", image_folder[0], "--save-stats", out, "--inception", random_inception[0],
                          "--resize", "pytorch-fid", "--batch-size", "2", "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    with np.load(saved_stats) as single, np.load(out) as sharded:
        for key in ("pool_features", "logits", "mu", "sigma", "mu_s", "sigma_s"):
            assert relative_error(sharded[key], single[key]) <= 1e-4, key


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance, Inception Score, precision/recall: closed forms, a peer, brute force
# ----------------------------------------------------------------------------------------------------------------
def test_frechet_distance_of_isotropic_gaussians_closed_form():
    # (mu1, a^2 I) vs (mu2, b^2 I): |mu1 - mu2|^2 + d (a - b)^2
    rng = np.random.default_rng(0)
    d, a, b = 64, 1.5, 0.7
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    value = fid.frechet_distance(mu1, a ** 2 * np.eye(d), mu2, b ** 2 * np.eye(d))
    assert value == pytest.approx(np.sum((mu1 - mu2) ** 2) + d * (a - b) ** 2, rel=1e-10)


def test_frechet_distance_equals_pytorch_fid_and_vanishes_on_itself():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48))
    y = rng.normal(size=(250, 48)) @ rng.normal(size=(48, 48)) + 0.3
    stats_x, stats_y = fid.gaussian_statistics(x), fid.gaussian_statistics(y)
    assert np.allclose(stats_x[1], np.cov(x, rowvar=False))                 # unbiased covariance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)                 # pytorch-fid passes sqrtm(disp=False)
        expected = calculate_frechet_distance(*stats_x, *stats_y)
    assert fid.frechet_distance(*stats_x, *stats_y) == pytest.approx(expected, rel=1e-6)
    assert abs(fid.frechet_distance(*stats_x, *stats_x)) < 1e-6 * np.trace(stats_x[1])


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(rundir.UserError, match="different dimensions"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def raw_sqrtm_fails(matrix):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(matrix)
        return not np.isfinite(root).all() or np.linalg.norm(root @ root - matrix) > 1e-3 * np.linalg.norm(matrix)


# Rank-1 covariances S1 = u u^T (features that vary along one direction) with full-rank S2: S1 S2 has the single
# non-zero eigenvalue u^T S2 u, so Tr (S1 S2)^(1/2) = sqrt(u^T S2 u). scipy's sqrtm fails on the first product with
# NaN (pytorch-fid retries too); on the second it returns, with some LAPACK builds, a finite non-root with imaginary
# parts ~1e8 (pytorch-fid's finiteness test misses it and it raises "Imaginary component"), with others a root.
SINGULAR_CASES = [
    ([2, 0, -1], [[5, -2, 4], [-2, 8, 2], [4, 2, 5]], True),
    ([2, -2, 1, 1, 2], [[9, -6, 4, -7, 3], [-6, 12, 2, 6, -8], [4, 2, 10, -6, -2], [-7, 6, -6, 13, -5],
                        [3, -8, -2, -5, 6]], False),
]


@pytest.mark.parametrize("u,sigma2,pytorch_fid_retries", SINGULAR_CASES)
def test_frechet_distance_of_a_singular_product_retries_with_eps(u, sigma2, pytorch_fid_retries):
    from pytorch_fid.fid_score import calculate_frechet_distance
    u, sigma2 = np.array(u, np.float64), np.array(sigma2, np.float64)
    sigma1 = np.outer(u, u)
    fails = raw_sqrtm_fails(sigma1 @ sigma2)
    assert fails or not pytorch_fid_retries                           # the problem is real (NaN everywhere)
    mu1, mu2 = np.zeros(len(u)), np.ones(len(u))
    expected = len(u) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(u @ sigma2 @ u)
    with pytest.warns(UserWarning, match="singular product") if fails else warnings.catch_warnings():
        value = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert value == pytest.approx(expected, rel=1e-3)                 # eps = 1e-6 moves it by O(sqrt(eps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not fails:                                                  # this LAPACK finds the root itself
            assert calculate_frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-3)
        elif pytorch_fid_retries:
            assert value == pytest.approx(calculate_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-12)
        else:
            with pytest.raises(ValueError, match="Imaginary component"):
                calculate_frechet_distance(mu1, sigma1, mu2, sigma2)


def test_frechet_distance_drops_a_negligible_imaginary_part_like_pytorch_fid():
    # fewer images than dimensions: singular covariances, and sqrtm returns a complex root with ~1e-8 imaginary parts
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(10)
    stats_x = fid.gaussian_statistics(rng.normal(size=(10, 64)))
    stats_y = fid.gaussian_statistics(rng.normal(size=(10, 64)) + 0.1)
    assert np.iscomplexobj(linalg.sqrtm(stats_x[1] @ stats_y[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no retry, no ComplexWarning
        value = fid.frechet_distance(*stats_x, *stats_y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert type(value) is float and value == pytest.approx(calculate_frechet_distance(*stats_x, *stats_y),
                                                               rel=1e-9)


def test_frechet_distance_of_non_psd_or_nan_statistics_is_a_one_line_error(tmp_path, capsys):
    # a "covariance" with a negative eigenvalue has an imaginary square root: no Frechet distance exists
    sigma = np.diag([1.0, -1.0, 2.0])
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=sigma)
    np.savez(tmp_path / "good.npz", mu=np.zeros(3), sigma=np.eye(3))
    message = cli_error([tmp_path / "bad.npz", tmp_path / "good.npz"], capsys)      # no Inception weights needed
    assert "imaginary component 1 " in message and "not positive semi-definite" in message
    with pytest.raises(rundir.UserError, match="NaN"):
        fid.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))


def test_inception_score_closed_forms():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)           # uniform p(y|x)
    classes = 7                                                                        # one-hot, spread evenly
    one_hot = np.full((70, 1008), -1e4)
    one_hot[np.arange(70), np.arange(70) % classes] = 0.0
    assert fid.inception_score(one_hot) == pytest.approx(classes)


def test_inception_score_uses_consecutive_chunks_of_5000():
    # First chunk: one class (IS 1); second chunk: 10 classes evenly (IS 10); ADM reports the mean, 5.5.
    # (One split over all 10000 would give exp(H(p_marginal)) with p = (0.55, 0.05, ..., 0.05), not 5.5.)
    logits = np.full((10000, 12), -1e4, dtype=np.float32)
    logits[:5000, 0] = 0
    logits[np.arange(5000, 10000), np.arange(5000) % 10] = 0
    assert fid.inception_score(logits) == pytest.approx(5.5)


def brute_force_precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019 with plain Euclidean distances and explicit loops over the balls."""
    def radii(points):
        distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(distances, axis=1)[:, k]                        # column 0 is the point itself
    def coverage(points, centres, centre_radii):
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, centre_radii)) for p in points])
    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(2)
    real = rng.normal(size=(80, 6))
    fake = 1.3 * rng.normal(size=(60, 6)) + 0.6
    expected = brute_force_precision_recall(real, fake)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95        # a non-trivial case
    assert fid.precision_recall(real, fake) == pytest.approx(expected, abs=1e-12)
    blocks = fid._row_blocks                                               # many small row blocks: same answer
    monkeypatch.setattr(fid, "_row_blocks", lambda rows, cols: blocks(rows, cols, budget=7 * cols))
    assert fid.precision_recall(real, fake) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_identical_and_far_apart():
    points = np.random.default_rng(3).normal(size=(40, 5))
    assert fid.precision_recall(points, points) == (1.0, 1.0)
    assert fid.precision_recall(points, points + 1000.0) == (0.0, 0.0)
    with pytest.raises(rundir.UserError, match="more than 3"):
        fid.precision_recall(points[:3], points)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: npz files, statistics round trips, ADM reference batches, bad files
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True])
def test_sample_npz_round_trip(tmp_path, compressed):
    images = np.random.default_rng(4).integers(0, 256, (7, 12, 10, 3), dtype=np.uint8)
    path = tmp_path / "samples.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=np.arange(7) % 3)
    source = fid.open_input(path)
    assert len(source.images) == 7 and source.image_size == (12, 10)
    assert np.array_equal(source.images.read(2, 6), images[2:6])
    assert np.array_equal(source.images.read(5, 100), images[5:])
    assert source.stats == {}


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(20, 2048)).astype(np.float32)
    stats = {"mu": pool.mean(0).astype(np.float64), "sigma": np.cov(pool, rowvar=False),
             "mu_s": rng.normal(size=2023), "sigma_s": np.eye(2023), "pool_features": pool,
             "logits": rng.normal(size=(20, 1008)).astype(np.float32)}
    fid.save_statistics(tmp_path / "stats.npz", stats, "tf", (64, 48))
    source = fid.open_input(tmp_path / "stats.npz")
    assert source.images is None and source.resize == "tf" and source.image_size == (64, 48)
    assert set(source.stats) == set(stats)
    for key, value in stats.items():
        assert np.array_equal(source.stats[key], value), key


@pytest.mark.parametrize("arrays,message", [
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8 images"),
    ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "must be uint8 images"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "expected 'arr_0'"),
    ({"mu": np.zeros(4), "sigma": np.eye(3)}, "must have shape"),
    ({"mu": np.zeros(4)}, "but not 'sigma'"),
    ({"mu": np.zeros(4, np.int64), "sigma": np.eye(4, dtype=np.int64)}, "floating point"),
    ({"pool_features": np.zeros((3, 100), np.float32)}, r"shape \(N, 2048\)"),
])
def test_bad_npz_files_are_rejected_clearly(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(rundir.UserError, match=message):
        fid.open_input(tmp_path / "bad.npz")


class FakeFeatures(torch.nn.Module):
    """A cheap stand-in for the Inception: a fixed random projection of the pixels to small feature vectors."""

    def __init__(self, pixels):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.randn(pixels, 8 + 6 + 5, generator=generator) / pixels ** 0.5

    def forward(self, images_uint8):
        z = images_uint8.flatten(1).float() / 255 @ self.projection
        return {"pool": z[:, :8], "spatial": z[:, 8:14], "logits": z[:, 14:]}


def test_evaluate_uses_adm_reference_statistics_and_reference_images(tmp_path):
    # ADM reference batch: its mu/sigma (whole data set) are used for FID, its arr_0 for precision/recall.
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(6)
    samples = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    reference = rng.integers(0, 200, (30, 4, 4, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=8), np.diag(rng.uniform(0.5, 2, size=8))
    mu_s, sigma_s = rng.normal(size=6), np.eye(6)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    model = FakeFeatures(4 * 4 * 3)
    metrics, notes = fid.evaluate(fid.open_input(tmp_path / "samples.npz"), fid.open_input(tmp_path / "ref.npz"),
                                  model, batch_size=16, progress=False)
    assert list(metrics) == ["FID", "sFID", "IS", "Precision", "Recall"] and notes == []
    with torch.no_grad():
        sample_features = model(torch.from_numpy(samples).permute(0, 3, 1, 2))
        reference_pool = model(torch.from_numpy(reference).permute(0, 3, 1, 2))["pool"].numpy()
    pool, spatial = sample_features["pool"].numpy(), sample_features["spatial"].numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert metrics["FID"] == pytest.approx(calculate_frechet_distance(
            pool.mean(0), np.cov(pool, rowvar=False), mu, sigma), rel=1e-5)
        assert metrics["sFID"] == pytest.approx(calculate_frechet_distance(
            spatial.mean(0), np.cov(spatial, rowvar=False), mu_s, sigma_s), rel=1e-5)
    assert metrics["IS"] == pytest.approx(fid.inception_score(sample_features["logits"].numpy()))
    assert (metrics["Precision"], metrics["Recall"]) == pytest.approx(
        brute_force_precision_recall(reference_pool.astype(np.float64), pool.astype(np.float64)), abs=1e-9)


def test_evaluate_with_pytorch_fid_stats_reference_reports_what_it_can(tmp_path):
    rng = np.random.default_rng(7)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(8), sigma=np.eye(8))            # pytorch-fid --save-stats format
    metrics, notes = fid.evaluate(fid.open_input(tmp_path / "samples.npz"), fid.open_input(tmp_path / "ref.npz"),
                                  FakeFeatures(48), progress=False)
    assert list(metrics) == ["FID", "IS"]
    assert any("sFID" in note for note in notes) and any("Precision" in note for note in notes)


# ----------------------------------------------------------------------------------------------------------------
# Weights: missing, corrupt, wrong checksum -> one clear line and exit code 2
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_npz(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    return path


def test_missing_weights_exit_2_with_instructions(tmp_path, tiny_npz):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")}
    env.pop("EPG_INCEPTION", None)
    result = subprocess.run([sys.executable, "fid.py", str(tiny_npz), str(tiny_npz), "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert fid.INCEPTION_FILENAME in result.stderr and "github.com/mseitzer/pytorch-fid/releases" in result.stderr
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in result.stderr       # where to put it


def test_corrupt_weights_exit_2_with_message(tmp_path, tiny_npz, capsys):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a torch file" * 10)
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(SystemExit) as exit_info:
        fid.main([str(tiny_npz), str(tiny_npz), "--inception", str(corrupt), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "cannot read Inception weights" in capsys.readouterr().err


def test_cached_weights_with_wrong_checksum_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("EPG_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / fid.INCEPTION_FILENAME).write_bytes(b"truncated download")
    with pytest.raises(rundir.UserError, match="corrupt"):
        fid.find_inception_weights()


def test_wrong_state_dict_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(rundir.UserError, match="missing keys"):
        fid.load_inception(path)


def cli_error(argv, capsys):
    """fid.main(argv) must exit with code 2 and one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_sample_file_exits_2_with_message(tmp_path, capsys):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    assert "must be uint8 images of shape (N, H, W, 3)" in cli_error([tmp_path / "float.npz", "--save-stats",
                                                                      tmp_path / "out.npz"], capsys)


def test_empty_npz_files_exit_2_with_one_line(tmp_path, tiny_npz, capsys):
    (tmp_path / "zero_bytes.npz").write_bytes(b"")                     # e.g. a sampler killed before writing
    np.savez(tmp_path / "no_images.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    assert "cannot read" in cli_error([tmp_path / "zero_bytes.npz", tiny_npz], capsys)
    assert "holds no images" in cli_error([tmp_path / "no_images.npz", "--save-stats", tmp_path / "s.npz"], capsys)
    assert "holds no images" in cli_error([tiny_npz, tmp_path / "no_images.npz"], capsys)


def test_inputs_of_two_resolutions_are_refused(tmp_path, tiny_npz, capsys):
    # Inception resizes both to 299x299 and would report a number; the check comes before the weights are needed
    np.savez(tmp_path / "wide.npz", arr_0=np.zeros((4, 8, 12, 3), np.uint8))
    message = cli_error([tiny_npz, tmp_path / "wide.npz"], capsys)
    assert "8x8" in message and "12x8" in message
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048)}
    fid.save_statistics(tmp_path / "stats.npz", stats, "tf", (16, 16))  # a statistics file remembers its size
    message = cli_error([tiny_npz, tmp_path / "stats.npz"], capsys)
    assert "8x8" in message and "16x16" in message


# ----------------------------------------------------------------------------------------------------------------
# Destinations (--save-stats, --out): checked before anything is computed, written whole or not at all
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """(folder, mounted): a real 64 KiB tmpfs where this process may mount one; else a plain folder, and the tests
    limit the file size of the fid.py process instead (RLIMIT_FSIZE), which fails its writes as a full disk does."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]
    mounted = shutil.which("mount") is not None and subprocess.run(mount, capture_output=True).returncode == 0
    yield folder, mounted
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def fill_up(folder):
    """Write into `folder` until its disk is full."""
    with open(folder / "filler", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
        while True:
            f.write(b"\0" * 4096)


def limit_file_size(limit):
    """preexec_fn of a child process whose writes beyond `limit` bytes fail (EFBIG) instead of killing it."""
    def limit_it():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_it


def fid_cli(*args, preexec_fn=None, env=None):
    return subprocess.run([sys.executable, "-W", "ignore::UserWarning", "fid.py", *map(str, args), "--device", "cpu",
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec_fn, env=env)


def assert_one_line_error(result):
    """Exit code 2 and stderr ending in one line "error: ..." (after notes, if any); returns that line."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: ") and all(line.startswith("note: ") for line in lines[:-1]), result.stderr
    return lines[-1]


def test_destination_in_a_missing_folder_is_refused_before_anything_is_computed(tmp_path, tiny_npz, capsys,
                                                                                 monkeypatch):
    # no Inception weights can be found: had the destination not been checked first, that would be the error
    monkeypatch.delenv("EPG_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    for argv in ([tiny_npz, "--save-stats", tmp_path / "absent" / "stats.npz"],
                 [tiny_npz, tiny_npz, "--out", tmp_path / "absent" / "metrics.json"]):
        message = cli_error(argv, capsys)
        assert f"folder '{tmp_path / 'absent'}' does not exist" in message, message
    assert not (tmp_path / "absent").exists()


def test_save_stats_onto_a_full_disk_is_one_line_and_keeps_the_previous_file(random_inception, image_folder,
                                                                               small_disk):
    folder, mounted = small_disk
    (folder / "stats.npz").write_bytes(b"previous statistics")
    if mounted:
        fill_up(folder)
    result = fid_cli(image_folder[0], "--save-stats", folder / "stats.npz", "--inception", random_inception[0],
                     preexec_fn=None if mounted else limit_file_size(0))
    message = assert_one_line_error(result)
    assert str(folder / "stats.npz") in message
    if mounted:                                          # refused before the features were computed
        assert "MB free" in message and "needs about" in message
    assert (folder / "stats.npz").read_bytes() == b"previous statistics"
    assert sorted(os.listdir(folder)) == (["filler"] if mounted else []) + ["stats.npz"]


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary_file(random_inception, image_folder,
                                                                                    tmp_path):
    # the statistics of 3 images are ~66 MB (two 2048-d float64 covariances): a 1 MB file-size limit stops the write
    # midway, after the disk check passed and the features were computed
    (tmp_path / "stats.npz").write_bytes(b"previous statistics")
    result = fid_cli(image_folder[0], "--save-stats", tmp_path / "stats.npz", "--inception", random_inception[0],
                     preexec_fn=limit_file_size(1 << 20))
    assert "could not write" in assert_one_line_error(result)
    assert (tmp_path / "stats.npz").read_bytes() == b"previous statistics"
    assert os.listdir(tmp_path) == ["stats.npz"]


def test_metrics_json_onto_a_full_disk_is_one_line_and_writes_nothing(tmp_path, small_disk):
    folder, mounted = small_disk
    rng = np.random.default_rng(11)
    for name in ("a", "b"):                       # 4-d statistics: no Inception, an instant Frechet distance
        features = rng.normal(size=(50, 4))
        np.savez(tmp_path / f"{name}.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    if mounted:
        fill_up(folder)
    result = fid_cli(tmp_path / "a.npz", tmp_path / "b.npz", "--out", folder / "metrics.json",
                     preexec_fn=None if mounted else limit_file_size(0))
    assert str(folder / "metrics.json") in assert_one_line_error(result)
    assert not (folder / "metrics.json").exists() and not [n for n in os.listdir(folder) if ".tmp-" in n]
    ok = fid_cli(tmp_path / "a.npz", tmp_path / "b.npz", "--out", tmp_path / "metrics.json")   # a working disk
    assert ok.returncode == 0, ok.stderr
    from pytorch_fid.fid_score import calculate_frechet_distance
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expected = calculate_frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"FID": pytest.approx(expected, rel=1e-9)}


# ----------------------------------------------------------------------------------------------------------------
# Slow (sqrtm of 2048x2048 matrices takes ~20 s on 2 cores): the full CLI against pytorch-fid's FID end to end.
# Run with EPG_SLOW_TESTS=1.
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("EPG_SLOW_TESTS"), reason="slow: set EPG_SLOW_TESTS=1")
def test_cli_fid_equals_pytorch_fid_end_to_end(random_inception, tmp_path):
    import pytorch_fid.fid_score
    import pytorch_fid.inception
    rng = np.random.default_rng(9)
    for name, offset in (("a", 0), ("b", 60)):
        (tmp_path / name).mkdir()
        for i in range(8):
            image = np.clip(rng.integers(0, 196, (32, 32, 3)) + offset, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / name / f"{i}.png")
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        patch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: random_inception[1])
        expected = pytorch_fid.fid_score.calculate_fid_given_paths(
            [str(tmp_path / "a"), str(tmp_path / "b")], batch_size=8, device="cpu", dims=2048, num_workers=0)
    result = subprocess.run([sys.executable, "fid.py", str(tmp_path / "a"), str(tmp_path / "b"), "--inception",
                             str(random_inception[0]), "--resize", "pytorch-fid", "--device", "cpu", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["FID", "sFID", "IS", "Precision", "Recall"]
    assert float(lines[0].split(": ")[1]) == pytest.approx(expected, rel=1e-4)
