"""ImageNet preparation, once before training: the ADM center crop (the paper's preprocessing) of every image under
SRC into DST/<same sub-folders>/<same stem>.png, lossless.

    python tools/prepare.py /data/imagenet/train /data/in256/train --image-size 256 --workers 16
    python tools/prepare.py /data/imagenet/val   /data/in256/val   --image-size 256 --workers 16

Existing outputs are skipped, so a rerun resumes. Unreadable inputs are skipped and reported; a destination that
cannot be written (a full disk, DST a file) stops the run with one line and exit code 2.
"""
import argparse
import contextlib
import multiprocessing
import os
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
import rundir  # noqa: E402


def _prepare_one(job):
    """(source, destination, image_size) -> (source, None) when written, else (source, ("read" | "write", reason))."""
    source, destination, image_size = job
    try:
        with Image.open(source) as im:
            image = data.adm_center_crop(im, image_size)
    except Exception as error:                  # any decoding problem: the input is unusable, the run goes on
        return source, ("read", f"{type(error).__name__}: {error}")
    partial = destination.with_name("." + destination.name + ".partial")      # never a half-written PNG
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        image.save(partial, format="PNG", compress_level=0)
        os.replace(partial, destination)
        return source, None
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink()
        return source, ("write", f"cannot write {destination} ({error.strerror or error})")


def prepare(source_dir, destination_dir, image_size, workers=0):
    """The module docstring's work -> (written, skipped, failed: [(path, error)] of unreadable inputs); a write
    failure raises rundir.UserError."""
    from tqdm import tqdm
    source_dir, destination_dir = Path(source_dir), Path(destination_dir)
    if not source_dir.is_dir():
        raise rundir.UserError(f"source folder {source_dir} does not exist or is not a directory")
    if image_size <= 0:
        raise rundir.UserError(f"--image-size must be positive, got {image_size}")
    jobs, seen, skipped, failed = [], set(), 0, []
    for folder, subfolders, files in os.walk(source_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(f for f in files if data.is_image_file(f)):
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
        raise rundir.UserError(f"no images (.png, .jpg, .jpeg) found under {source_dir}")
    written, parallel = 0, workers > 0 and len(jobs) > 1
    with tqdm(total=len(jobs), desc=f"prepare {image_size}px", unit="img") as progress, \
            (multiprocessing.Pool(workers) if parallel else contextlib.nullcontext()) as pool:
        for source, error in pool.imap_unordered(_prepare_one, jobs, 16) if parallel else map(_prepare_one, jobs):
            if error is None:
                written += 1
            elif error[0] == "write":           # the pool is stopped on the way out
                raise rundir.UserError(f"{error[1]}; free disk space or choose another DST, then rerun (the "
                                         f"images written so far are kept)")
            else:
                failed.append((source, error[1]))
            progress.update(1)
    return written, skipped, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source folder, e.g. SRC/<class_name>/<image files>")
    p.add_argument("dst", metavar="DST", help="destination folder (created); keeps SRC's sub-folders and file stems")
    p.add_argument("--image-size", type=int, default=256, help="output side length in pixels")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes; 0 = in this process")
    args = p.parse_args(argv)
    written, skipped, failed = prepare(args.src, args.dst, args.image_size, args.workers)
    for source, error in failed:
        print(f"warning: skipped {source}: {error}", file=sys.stderr)
    print(f"wrote {written} PNGs to {args.dst}, skipped {skipped} that already existed, {len(failed)} unreadable")


if __name__ == "__main__":
    rundir.cli_main(main)
