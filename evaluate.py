"""How a run is judged, in one place: what the fine-tuning scripts evaluate while they train (--eval-every), what
pre-training probes, and what make demo scores. Samples of the embedded data set are judged by its reference
classifier (class accuracy and FD_ref, a Frechet distance in the classifier's feature space, NOT comparable to
Inception FID); samples of an ImageFolder data set by fid.py's Inception network against a reference batch (FID,
sFID, IS, precision/recall); an encoder by its kNN probe.

    python evaluate.py score SAMPLES.npz [--out metrics.json]      # class accuracy and FD_ref of embedded-set samples
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid
import rundir
import shapes

DataError = rundir.UserError


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
        images, labels = shapes.load_split("train", image_size, CLASSIFIER_TRAIN_IMAGES)
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
        val_images, val_labels = shapes.load_split("val", image_size)
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
    rundir.write_atomically(path, lambda f: torch.save(saved, f))     # concurrent processes never read half a file
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
    if labels is not None and (labels.min() < 0 or labels.max() >= len(shapes.SHAPE_CLASSES)):
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



# ---- kNN probe of an encoder (pre-training's progress) ----
class KnnProbe:
    """Weighted kNN accuracy (k = 20, votes exp(cos / 0.07), as InstDisc/DINO) of features(x, sigma) -> (N, D):
    `probe_acc` of clean queries (at sigma_clean, the level of the training views) against the clean bank,
    `probe_acc_noisy` of queries noised to sigma_noisy with the fixed `noise`. bank, queries: (images, labels)."""

    def __init__(self, bank, queries, noise, sigma_clean, sigma_noisy):
        (self.bank_x, self.bank_y), (self.query_x, self.query_y), self.noise = bank, queries, noise
        self.sigma_clean, self.sigma_noisy = sigma_clean, sigma_noisy
        self.num_classes = int(max(self.bank_y.max(), self.query_y.max())) + 1

    @staticmethod
    @torch.no_grad()
    def _features(features, x, sigma):
        return torch.cat([F.normalize(features(chunk, sigma).float(), dim=-1) for chunk in x.split(256)])

    def _knn(self, query, bank):
        sim, idx = (query @ bank.T).topk(min(20, bank.shape[0]), dim=1)
        votes = torch.zeros(query.shape[0], self.num_classes, device=query.device)
        votes.scatter_add_(1, self.bank_y.to(query.device)[idx], (sim / 0.07).exp())
        return (votes.argmax(1).cpu() == self.query_y).float().mean().item()

    def __call__(self, features):
        bank = self._features(features, self.bank_x, self.sigma_clean)
        clean = self._features(features, self.query_x, self.sigma_clean)
        noisy = self._features(features, self.query_x + self.sigma_noisy * self.noise, self.sigma_noisy)
        return {"probe_acc": round(self._knn(clean, bank), 4), "probe_acc_noisy": round(self._knn(noisy, bank), 4)}



def main(argv=None):
    parser = argparse.ArgumentParser(description="Class accuracy and FD_ref (NOT comparable to Inception FID: fid.py) "
                                                 "of embedded-data-set samples, by the reference classifier (trained "
                                                 "once)")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("score", help="score a samples.npz of the embedded data set")
    s.add_argument("samples", metavar="SAMPLES.npz", help="arr_0: images (N, H, W, 3) uint8; arr_1: labels (optional)")
    s.add_argument("--device", default="cpu", help="device of the classifier (default: cpu)")
    s.add_argument("--cache-dir", default=None, help="classifier cache (default: $EPG_CACHE, else ~/.cache/epg)")
    s.add_argument("--out", metavar="metrics.json", default=None, help="also write the metrics as JSON")
    args = parser.parse_args(argv)
    if args.out:                                   # before the work: the folder exists, takes a file, has room
        fid.check_destination(args.out, 4096)
    metrics = score(args.samples, args.device, args.cache_dir)
    for name, value in metrics.items():
        print(f"{METRIC_NAMES[name]}: {value:.8g}")
    if args.out:
        rundir.write_json(args.out, metrics)


if __name__ == "__main__":
    rundir.cli_main(main)
