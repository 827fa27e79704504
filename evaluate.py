"""How a run is judged, in one place: what the fine-tuning scripts evaluate while they train (--eval-every), what
pre-training probes, and what make demo scores. Samples of the embedded data set are judged by its reference
classifier (class accuracy and FD_ref, a Frechet distance in the classifier's feature space, NOT comparable to
Inception FID); samples of an ImageFolder data set by fid.py's Inception network against a reference batch (FID,
sFID, IS, precision/recall); an encoder by its kNN probe.

    python evaluate.py score SAMPLES.npz [--out metrics.json]      # class accuracy and FD_ref of embedded-set samples
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import fid
import losses
import rundir
import shapes
import trainlib


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
        raise rundir.UserError(f"the reference classifier needs uint8 images of shape (N, H, W, 3), got "
                               f"{images.dtype} {tuple(images.shape)}")
    if len(images) < 2:
        raise rundir.UserError(f"need at least 2 images for FD_ref, got {len(images)}")
    image_size = int(image_size or images.shape[1])
    if tuple(images.shape[1:3]) != (image_size, image_size) or image_size < 8:
        raise rundir.UserError(f"images are {images.shape[2]}x{images.shape[1]} but the reference classifier takes "
                               f"square images of the embedded data set's size (8 px or more; here {image_size})")
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        raise rundir.UserError(f"need one integer label per image, got {labels.dtype} labels of shape {labels.shape}")
    if labels is not None and (labels.min() < 0 or labels.max() >= len(shapes.SHAPE_CLASSES)):
        raise rundir.UserError(f"labels must be classes 0..9 of the embedded data set, got "
                               f"{labels.min()}..{labels.max()}")
    classifier = reference_classifier(image_size, device, cache_dir)
    features, logits = classify(classifier, images.permute(0, 3, 1, 2))
    return classifier_metrics(classifier, features, logits, labels)


def classifier_metrics(classifier, features, logits, labels=None):
    """FD_ref of the features against the val split's, class accuracy (given labels), the classifier's val_acc."""
    mu, sigma = fid.gaussian_statistics(np.asarray(features, dtype=np.float64))
    metrics = {"fd_ref": fid.frechet_distance(mu, sigma, classifier.val_mu, classifier.val_sigma)}
    if labels is not None:
        metrics["class_acc"] = (np.asarray(logits).argmax(1) == np.asarray(labels)).mean().item()
    metrics["val_acc"] = classifier.val_acc
    return metrics


def score(path, device="cpu", cache_dir=None):
    """embedded_metrics of a sample npz: arr_0 images (N, H, W, 3) uint8, optional arr_1 labels (N,)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("arr_0", "arr_1") if key in npz.files}
    except Exception as error:
        raise rundir.UserError(f"cannot read {path} as an npz file ({type(error).__name__}: {error})") from None
    if "arr_0" not in arrays or arrays["arr_0"].size == 0:
        raise rundir.UserError(f"{path} holds no images (expected arr_0: N x H x W x 3 uint8, N >= 2)")
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



# ---- Samples as sample.py draws them: image i from noise seeded by (seed, i) ----
_TAG_IMAGE = 7919                  # sample.py's image-noise stream (keeps the online evaluation equal to sample.py)


def initial_noise(seed, indices, shape, draws=1):
    """Standard normal noise (draws, len(indices), *shape) of the images `indices`, from generators seeded by (seed,
    index): draw 0 becomes x_T, the others are the noise of later consistency steps."""
    out = torch.empty(draws, len(indices), *shape)
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(trainlib.mix_seed(seed, int(i), _TAG_IMAGE))
        for k in range(draws):
            out[k, j] = torch.randn(shape, generator=g)
    return out


@torch.no_grad()
def generate(model, cfg, indices, labels, s, device, autocast=contextlib.nullcontext, counter=None):
    """Model-space float32 samples (B, 3, H, W) of the images `indices` with `labels`; s: sampler settings (sampler,
    steps, mid_sigma, cfg_scale, cfg_interval, seed) and clamp bounds (s.bounds)."""
    size, shift = cfg["image_size"], losses.resolution_shift(cfg["image_size"])
    labels = labels.to(device)
    if s.sampler == "consistency":
        mids = [s.mid_sigma] if s.steps == 2 else []
        z = initial_noise(s.seed, indices, (3, size, size), draws=1 + len(mids)).to(device)
        f = losses.consistency_fn(model, labels, shift, s.bounds, counter, autocast)
        return losses.consistency_sample(f, z, shift, mids).float()
    z = initial_noise(s.seed, indices, (3, size, size))[0].to(device)
    sigmas = losses.sampling_sigmas(s.steps, size)
    denoiser = losses.guided_denoiser(model, labels, cfg["num_classes"], shift, s.cfg_scale, tuple(s.cfg_interval),
                                      s.bounds, counter, autocast)
    sampler = losses.heun_sample if s.sampler == "heun" else losses.euler_sample
    return sampler(denoiser, float(sigmas[0]) * z, sigmas).float()


# ---- The online evaluation of the fine-tuning scripts (--eval-every) ----
HELDOUT_IMAGES, PROBE_BANK, PROBE_QUERIES = 1000, 2000, 1000   # the held-out eq. 1 batch, the kNN probe's sets
SIGMA_BINS = (0.0, 0.1, 1.0, 10.0, math.inf)                    # of the unshifted t_n: the held-out loss per bin
_TAG_HELDOUT = 7949


class Evaluator:
    """What a fine-tuning run measures every --eval-every steps and at its last step (one code path): --eval-samples
    class-balanced EMA samples drawn as sample.py draws them (diffusion: Heun --sample-steps with the run's guidance,
    or each --eval-cfg scale from the same noise; consistency: one step, and two with a recorded mid level), judged by
    the embedded data set's reference classifier (class_acc, fd_ref) or by Inception against --eval-ref (fid, sfid,
    is, precision, recall); the EMA encoder's kNN probe; for diffusion, the held-out eq. 1 loss, in total and per
    noise bin, on a fixed batch. Each rank draws a share, the features are gathered, rank 0 scores and appends one
    record to metrics.jsonl. Its own random streams: the training's are untouched. Every input is checked here, at
    the start of the run."""

    def __init__(self, args, env, stage, num_classes, log, start=0):
        self.args, self.env, self.stage, self.log, self.num_classes = args, env, stage, log, num_classes
        self.n, self.every, self.device = args.eval_samples, args.eval_every, env.device
        self.cfg = {"image_size": args.image_size, "num_classes": num_classes}
        self.shift = losses.resolution_shift(args.image_size)
        self.judge = self.reference = None
        if args.data is not None and args.eval_ref is None:
            if self.every:
                raise rundir.UserError(f"--eval-every {self.every} on the ImageFolder {args.data} needs --eval-ref "
                                       f"REF.npz (an ADM reference batch or `fid.py --save-stats` statistics) and "
                                       f"--inception PATH; or pass --eval-every 0")
            self.n = 0                                  # no reference: no evaluation (sample.py + fid.py later)
        elif self.n and args.data is not None:
            ref = fid.open_input(args.eval_ref)
            if ref.image_size is not None and tuple(ref.image_size) != (args.image_size, args.image_size):
                raise rundir.UserError(f"--eval-ref {args.eval_ref} holds {ref.image_size[1]}x{ref.image_size[0]} "
                                       f"images, this run trains at {args.image_size}px; use a reference of that size")
            if ref.resize not in (None, "tf"):
                raise rundir.UserError(f"--eval-ref {args.eval_ref} was computed with --resize {ref.resize}; the "
                                       f"online evaluation uses tf: recompute it with fid.py --save-stats")
            self.judge = fid.load_inception(args.inception, self.device)
            self.reference = fid.EvalInput(ref.name, stats=fid.input_statistics(ref, self.judge, device=self.device,
                                                                                   progress=env.main))
        elif self.n:
            self.judge = reference_classifier(args.image_size, self.device)
        self.settings = self._settings()
        self.probe = self.heldout = None
        if env.main and self.n:
            probe_sets = data.probe_sets(args.data, args.image_size, args.normalize, args.seed, PROBE_BANK,
                                         PROBE_QUERIES)
            self.probe = KnnProbe(*probe_sets, self.shift * losses.SIGMA_MIN, self.shift * 1.0)
            if stage == "diffusion":
                x, y = (t[:HELDOUT_IMAGES] for t in probe_sets[1])
                g = torch.Generator().manual_seed(trainlib.mix_seed(args.seed, _TAG_HELDOUT))
                sigma, weight = losses.diffusion_noise(len(x), g, args.p_mean, args.p_std)
                self.heldout = x, y, sigma, weight, torch.randn(x.shape, generator=g)
        self.recorded = self._recorded(start)

    def _settings(self):
        """{metric suffix: sampler settings} of the evaluation's samplers."""
        a, run = self.args, dict(self.args.sampling)
        base = dict(seed=0, bounds=data.data_range(a.normalize), mid_sigma=run.get("mid_sigma"))
        if self.stage == "consistency":
            out = {"": dict(base, sampler="consistency", steps=1, cfg_scale=1.0, cfg_interval=(0, 0))}
            if run.get("mid_sigma"):
                out["_2step"] = dict(out[""], steps=2)
        else:
            heun = dict(base, sampler="heun", steps=a.sample_steps, cfg_scale=run.get("cfg_scale", 1.0),
                        cfg_interval=a.eval_cfg_interval or run.get("cfg_interval", (0.19, 1.61)))
            out = {f"_cfg{w:g}": dict(heun, cfg_scale=w) for w in a.eval_cfg} or {"": heun}
        return {k: argparse.Namespace(**v) for k, v in out.items()}

    def _recorded(self, start):
        """The steps <= start that metrics.jsonl already holds an evaluation of (a resumed run redoes no other)."""
        path, steps = os.path.join(self.args.out, "metrics.jsonl"), set()
        if start and os.path.isfile(path):
            with open(path, "rb") as f:
                for line in f:
                    with contextlib.suppress(ValueError, AttributeError):
                        record = json.loads(line)
                        if "eval_seconds" in record and record.get("step", 0) <= start:
                            steps.add(record["step"])
        return steps

    def due(self, step):
        """Whether `step` is evaluated: every --eval-every steps and at the last step, once."""
        return bool(self.n) and step > 0 and step not in self.recorded and (
            step == self.args.steps or bool(self.every) and step % self.every == 0)

    def __call__(self, step, model, meter):
        """At the end of `step`: evaluate `model` (the EMA, eval mode) if due, SIGTERM/SIGINT stopping it between
        chunks (the checkpoint of `step` is written first, so a rerun redoes it); a grid every --sample-every steps
        and at the last step."""
        if self.due(step):
            self.evaluate(step, model, meter)
        grid = os.path.join(self.args.out, f"samples_{step:07d}.png")
        every = getattr(self.args, "sample_every", 0)
        if self.env.main and step > 0 and (every and step % every == 0 or step == self.args.steps
                                           and not os.path.exists(grid)):
            self.grid(model, grid)

    def evaluate(self, step, model, meter):
        t0, record = time.perf_counter(), {}
        for suffix, s in self.settings.items():
            for key, value in self._score(self._features(model, s, step)).items():
                record[key + suffix] = value
        if self.env.main:
            record.update(self._encoder_metrics(model))
        seconds = time.perf_counter() - t0
        meter.write(step=step, eval_samples=self.n, eval_seconds=round(seconds, 2), **record)
        self.recorded.add(step)
        meter.exclude(seconds)
        self.log(f"evaluation at step {step} ({self.n} samples, {seconds:.0f} s): "
                 + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if not k.startswith("heldout_mse")))

    @torch.no_grad()
    def _features(self, model, s, step, chunk=100):
        """This rank's share of the samples -> the judge's features, gathered over the ranks (image order)."""
        labels = torch.arange(self.n) * self.num_classes // self.n                  # balanced (sample.py's)
        per_rank = math.ceil(self.n / self.env.world)
        begin, end = min(self.env.rank * per_rank, self.n), min((self.env.rank + 1) * per_rank, self.n)
        outputs, autocast = {}, lambda: trainlib.autocast(self.device)
        for first in range(begin, begin + per_rank, chunk):            # every rank the same number of rounds
            idx = torch.arange(first, min(first + chunk, end))
            if len(idx):
                images = torch.from_numpy(data.to_uint8_hwc(generate(model, self.cfg, idx, labels[idx], s, self.device,
                                                                     autocast), self.args.normalize))
                for key, value in self._judge(images.permute(0, 3, 1, 2).to(self.device)).items():
                    outputs.setdefault(key, []).append(value.float())
            stop = rundir.preempted(self.env)
            if stop:
                raise rundir.Preempted(stop, f"stopped in the evaluation of step {step}; {self.args.out}/ckpt_last.pt "
                                             f"holds step {step}; rerun to resume (the evaluation is redone)")
        if not outputs:                 # a rank without samples still joins the gather with the right shapes
            blank = torch.zeros(1, 3, self.args.image_size, self.args.image_size, dtype=torch.uint8, device=self.device)
            outputs = {key: [value.float()[:0]] for key, value in self._judge(blank).items()}
        features = {k: fid.all_gather_rows(torch.cat(v), self.n).cpu().numpy() for k, v in outputs.items()}
        return dict(features, labels=labels.numpy())

    def _judge(self, images):
        if self.reference is None:                                                   # the reference classifier
            features, logits = self.judge(images)
            return {"features": features, "logits": logits}
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # as fid.py
        try:
            return self.judge(images)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def _score(self, f):
        if not self.env.main:
            return {}
        if self.reference is None:
            metrics = classifier_metrics(self.judge, f["features"], f["logits"], f["labels"])
            return {k: v for k, v in metrics.items() if k != "val_acc"}
        ours = {"pool_features": f["pool"], "logits": f["logits"]}
        ours["mu"], ours["sigma"] = fid.gaussian_statistics(f["pool"])
        ours["mu_s"], ours["sigma_s"] = fid.gaussian_statistics(f["spatial"])
        metrics, _ = fid.evaluate(fid.EvalInput("samples", stats=ours), self.reference, None, device=self.device,
                                  progress=False)
        return {k.lower(): v for k, v in metrics.items()}

    @torch.no_grad()
    def _encoder_metrics(self, model):
        """The EMA encoder's kNN probe ([CLS] after the final LayerNorm, no class offset) and the held-out eq. 1 loss
        (diffusion): the weighted total and the unweighted MSE per bin of the unshifted t_n."""
        def features(x, sigma):
            return model.encoder(*losses.precondition(x.to(self.device), torch.full((len(x),), sigma,
                                                                                    device=self.device)))[0][:, 0]
        with trainlib.autocast(self.device):
            record = self.probe(features)
        if self.heldout is None:
            return record
        total, sums, counts = 0.0, torch.zeros(len(SIGMA_BINS) - 1), torch.zeros(len(SIGMA_BINS) - 1)
        for part in torch.arange(len(self.heldout[0])).split(250):
            x, y, sigma, weight, eps = (t[part].to(self.device) for t in self.heldout)
            with trainlib.autocast(self.device):
                mse = losses.diffusion_loss(model, x, y, self.shift * sigma, torch.ones_like(weight), eps).cpu()
            total += (weight.cpu() * mse).sum().item()
            bins = torch.bucketize(sigma.cpu().float(), torch.tensor(SIGMA_BINS[1:-1]), right=True)
            sums.scatter_add_(0, bins, mse.float())
            counts += torch.bincount(bins, minlength=len(sums)).float()
        record["heldout_loss"] = total / len(self.heldout[0])
        for k, (lo, hi) in enumerate(zip(SIGMA_BINS[:-1], SIGMA_BINS[1:])):
            if counts[k]:
                record[f"heldout_mse_t{lo:g}-{hi:g}"] = (sums[k] / counts[k]).item()
        return record

    @torch.no_grad()
    def grid(self, model, path, per_class=8):
        """A PNG of up to 10 classes x 8 samples of the run's own sampler, one row per class."""
        grid_classes = torch.linspace(0, self.num_classes - 1, min(self.num_classes, 10)).round().long()
        labels = grid_classes.repeat_interleave(per_class)
        s = next(iter(self.settings.values()))
        x = generate(model, self.cfg, torch.arange(len(labels)), labels, s, self.device,
                     lambda: trainlib.autocast(self.device))
        data.save_grid(data.to_uint8_hwc(x, self.args.normalize), path, columns=per_class)


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
