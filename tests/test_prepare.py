"""tools/prepare.py: the ADM center crop (closed forms), PNGs written once and skipped on a rerun, unreadable inputs
skipped and counted, and a destination that cannot be written (a real full disk, DST a file) stopping in one line."""
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import data  # noqa: E402
import prepare  # noqa: E402
import rundir  # noqa: E402


def prepare_cli(*args, preexec_fn=None):
    return subprocess.run([sys.executable, os.path.join("tools", "prepare.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_adm_center_crop_exact_on_aligned_image():
    """1024x512 white with a centred 256-px black square -> 128: two exact box halvings (to 256x128), no resize,
    crop x 64..192: the square becomes the centred 64-px block 32..96."""
    canvas = np.full((512, 1024, 3), 255, dtype=np.uint8)
    canvas[128:384, 384:640] = 0
    out = np.asarray(data.adm_center_crop(Image.fromarray(canvas), 128))
    expected = np.full((128, 128, 3), 255, dtype=np.uint8)
    expected[32:96, 32:96] = 0
    np.testing.assert_array_equal(out, expected)


def test_adm_center_crop_keeps_centre_on_odd_sizes():
    canvas = np.zeros((203, 301, 3), dtype=np.uint8)
    canvas[91:112, 140:161] = 255  # centred bright square
    out = np.asarray(data.adm_center_crop(Image.fromarray(canvas).convert("L"), 48)).astype(np.float64)
    assert out.shape == (48, 48, 3)
    weights = out[..., 0].clip(0)
    ys, xs = np.mgrid[0:48, 0:48]
    assert abs((weights * ys).sum() / weights.sum() - 23.5) < 0.6
    assert abs((weights * xs).sum() / weights.sum() - 23.5) < 0.6


def test_cli_writes_pngs_skips_unreadable_inputs_and_resumes(tmp_path):
    src = tmp_path / "src"
    (src / "n01").mkdir(parents=True)
    (src / "n02").mkdir(parents=True)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(src / "n01" / "n01_1.JPEG", quality=95)
    Image.new("L", (20, 50), 9).save(src / "n02" / "n02_7.png")
    (src / "n02" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    dst = tmp_path / "dst"
    first = prepare_cli(src, dst, "--image-size", 16, "--workers", 2)
    assert first.returncode == 0, first.stderr
    assert "wrote 2 PNGs" in first.stdout and "1 unreadable" in first.stdout and "broken.jpg" in first.stderr
    outputs = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert outputs == ["n01/n01_1.png", "n02/n02_7.png"]
    for path in dst.rglob("*.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (16, 16) and im.mode == "RGB"
        assert path.stat().st_size > 16 * 16 * 3  # stored uncompressed (compress_level=0)
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")}
    written, skipped, failed = prepare.prepare(src, dst, 16)
    assert (written, skipped, [path for path, _ in failed]) == (0, 2, [src / "n02" / "broken.jpg"])
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.png")} == stamps
    assert len(data.ImageFolder(dst, 16)) == 2


def test_16_bit_grayscale_pngs_keep_their_values(tmp_path):
    """A 16-bit PNG (PIL mode I;16) scales by 255/65535: 65535 -> 255, 32768 -> round(127.502) = 128, 0 -> 0 (PIL's
    own convert("RGB") would clip everything above 255 to white)."""
    values = np.full((16, 16), 32768, dtype=np.uint16)
    values[0], values[1] = 65535, 0
    (tmp_path / "src" / "grey").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "src" / "grey" / "a.png")
    Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(tmp_path / "src" / "grey" / "b.png")
    with Image.open(tmp_path / "src" / "grey" / "a.png") as im:
        assert im.mode == "I;16"
    assert prepare.prepare(tmp_path / "src", tmp_path / "dst", 16) == (2, 0, [])
    expected = np.full((16, 16, 3), 128, dtype=np.uint8)
    expected[0], expected[1] = 255, 0
    with Image.open(tmp_path / "dst" / "grey" / "a.png") as a, Image.open(tmp_path / "dst" / "grey" / "b.png") as b:
        assert a.mode == b.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(a), expected)
        np.testing.assert_array_equal(np.asarray(b), 128)  # cropped and resized: a uniform image stays uniform


def test_bad_source_or_destination_is_one_user_error(tmp_path):
    with pytest.raises(rundir.UserError, match="does not exist"):
        prepare.prepare(tmp_path / "nope", tmp_path / "out", 16)
    (tmp_path / "src" / "cls").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "src" / "cls" / "a.png")
    (tmp_path / "dst_file").write_bytes(b"a regular file")
    with pytest.raises(rundir.UserError, match=r"cannot write .*dst_file.*Not a directory"):
        prepare.prepare(tmp_path / "src", tmp_path / "dst_file", 16)
    (tmp_path / "dst" / "cls").parent.mkdir()
    (tmp_path / "dst" / "cls").write_bytes(b"a file where a class folder goes")
    with pytest.raises(rundir.UserError, match=r"cannot write .*a\.png"):
        prepare.prepare(tmp_path / "src", tmp_path / "dst", 16)
    assert (tmp_path / "dst_file").read_bytes() == b"a regular file"


def test_full_disk_stops_in_one_line_with_exit_2_and_leaves_no_partial_file(tmp_path):
    """A real full disk: a 64 KiB tmpfs where this process may mount one, else a file-size limit of 4 KiB for the
    prepare.py process (RLIMIT_FSIZE, SIGXFSZ ignored). Each 64x64 PNG is 12 KiB uncompressed, 12 of them 147 KiB."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "cls").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (80, 70), (i, 2 * i, 3 * i)).save(src / "cls" / f"{i:02d}.png")
    dst.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(dst)]
    mounted = shutil.which("mount") is not None and subprocess.run(mount, capture_output=True).returncode == 0

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    try:
        for workers in (0, 2):
            result = prepare_cli(src, dst, "--image-size", 64, "--workers", workers,
                                 preexec_fn=None if mounted else limit_file_size)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            message = result.stderr.strip().splitlines()[-1]       # after the progress bar
            assert message.startswith("error: cannot write " + str(dst / "cls")), message
            assert ("No space left on device" if mounted else "File too large") in message
            assert "unreadable" not in result.stdout + result.stderr
            leftovers = [p.name for p in dst.rglob("*") if p.is_file() and not p.name.endswith(".png")]
            assert leftovers == []                                  # no .partial file
            for path in dst.rglob("*.png"):                         # what was written is whole
                with Image.open(path) as im:
                    assert im.size == (64, 64) and im.getpixel((0, 0)) == tuple(int(path.stem) * k for k in (1, 2, 3))
    finally:
        if mounted:
            subprocess.run(["umount", str(dst)], check=True)
