"""Reliability of every stage: kills (also during a checkpoint write), resume on another number of processes,
refused resumes, non-finite losses, unwritable outputs, and one table of bad command-line inputs.

What the other test files already check is not repeated here (per training script: kill -9 between checkpoints +
rerun == uninterrupted, 2 processes == 1 process; sample.py/fid.py: missing/corrupt checkpoint and weights, bad
npz via fid.open_input). Every assertion is against an invariant: a checkpoint that survives a kill equals the
uninterrupted run's checkpoint of the same step (bitwise, CPU), a resumed run ends where the uninterrupted one ends,
a refused command leaves the output directory byte-for-byte as it was, a user error is one line and exit code 2.
CPU, EPG-T/RCM-T at 16 px, global batch 4, a few steps; runs in-process where it can (start-up dominates).
"""
import contextlib
import hashlib
import math
import io
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import fid
import models
import pretrain
import sample
import train_consistency
import train_diffusion
import rundir
import trainlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
SIZE = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks on a shared 2-core machine: one thread, as in the subprocesses (OMP_NUM_THREADS=1), so that
    in-process and subprocess runs compute bitwise the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(folder):
    """{relative path: sha256} of every file under `folder` ({} when it does not exist)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cli(monkeypatch, capsys, module, argv):
    """Run `module.main` in this process as `python module.py argv` under rundir.cli_main.
    Returns (exit code, stdout, stderr); exit code 0 when main returned normally."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    try:
        code = rundir.cli_main(module.main) or 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, expected):
    """Exit code 2, no traceback, and the last line is our 'error: ...' or argparse's 'PROG: error: ...'."""
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines, "no message on stderr"
    last = lines[-1]
    assert last.startswith("error:") or re.match(r"^[\w.]+\.py: error: ", last), last
    assert expected in last, last


def assert_same_state(a, b, parts, where=""):
    """Bitwise equality of the weight dicts `parts` and of the AdamW state of two checkpoints."""
    assert a["step"] == b["step"], where
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{where}: {part}.{k}"
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][i][name])), \
                f"{where}: optimizer {i}.{name}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and data directories the tests point the scripts at."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {}
    for size in (SIZE, 32):                                    # pre-trained RCM-T checkpoints (random weights)
        torch.manual_seed(0)
        rcm = models.build_rcm("T", size)
        paths[f"rcm{size}"] = str(root / f"rcm{size}.pt")
        rundir.save_checkpoint(paths[f"rcm{size}"], {
            "stage": "pretrain", "config": {"model": "T", "image_size": size, "normalize": "simple"},
            "step": 0, "model": rcm.state_dict()})
    torch.manual_seed(1)
    epg = models.build_epg("T", SIZE, 10).state_dict()
    config = dict(model="T", image_size=SIZE, num_classes=10, normalize="simple", patch_size=2)
    for name, cfg in (("dm", config), ("dm_wrong_size", {**config, "model": "S"})):
        paths[name] = str(root / f"{name}.pt")
        rundir.save_checkpoint(paths[name], {"stage": "diffusion", "config": cfg, "step": 3, "model": epg,
                                               "ema": epg, "optimizer": {}})
    blob = open(paths["dm"], "rb").read()
    paths["truncated_ckpt"] = str(root / "truncated.pt")
    open(paths["truncated_ckpt"], "wb").write(blob[:len(blob) // 2])
    paths["garbage_ckpt"] = str(root / "garbage.pt")
    open(paths["garbage_ckpt"], "wb").write(b"PK\x03\x04 not a checkpoint" * 20)

    # data directories: missing, empty, only non-image files, only corrupt images, only truncated images
    paths["data_missing"] = str(root / "no_such_dir")
    (root / "data_empty").mkdir()
    paths["data_empty"] = str(root / "data_empty")
    for kind in ("text", "corrupt", "truncated"):
        folder = root / f"data_{kind}" / "cls"
        folder.mkdir(parents=True)
        paths[f"data_{kind}"] = str(folder.parent)
        for i in range(3):
            if kind == "text":
                (folder / f"{i}.txt").write_text("not an image")
            elif kind == "corrupt":
                (folder / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
            else:
                buffer = io.BytesIO()
                Image.fromarray(np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                    buffer, format="PNG")
                (folder / f"{i}.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])

    # npz files for fid.py: one valid, and wrong key / shape / dtype / labels / truncated / not an npz at all
    images = np.zeros((4, 8, 8, 3), np.uint8)
    npz = {"good": dict(arr_0=images), "wrong_key": dict(images=images),
           "wrong_shape": dict(arr_0=images.transpose(0, 3, 1, 2).copy()),
           "wrong_dtype": dict(arr_0=images.astype(np.uint16)),
           "wrong_labels": dict(arr_0=images, arr_1=np.zeros(4, np.float32))}
    for name, arrays in npz.items():
        paths[f"npz_{name}"] = str(root / f"{name}.npz")
        np.savez(paths[f"npz_{name}"], **arrays)
    blob = open(paths["npz_good"], "rb").read()
    paths["npz_truncated"] = str(root / "truncated.npz")
    open(paths["npz_truncated"], "wb").write(blob[:len(blob) // 2])
    paths["npz_text"] = str(root / "text.npz")
    open(paths["npz_text"], "w").write("arr_0 = 1, 2, 3")
    paths["regular_file"] = str(root / "regular_file")
    open(paths["regular_file"], "w").write("a file, not a directory")
    return paths


def base_args(script, files):
    """A tiny, valid command line of each script (later flags override earlier ones)."""
    common = ["--model", "T", "--data", "shapes", "--image-size", SIZE, "--batch-size", 4, "--steps", 2,
              "--device", "cpu", "--log-every", 1]
    return {
        pretrain: common + ["--probe-every", 0],
        train_diffusion: common + ["--init", files["rcm16"], "--sample-every", 0, "--eval-samples", 0,
                                   "--sample-steps", 2],
        train_consistency: common + ["--init", files["rcm16"], "--eval-samples", 0],
        sample: ["--ckpt", files["dm"], "--num-samples", 2, "--steps", 2, "--device", "cpu", "--no-progress"],
        fid: ["--device", "cpu", "--no-progress"],                               # + SAMPLES [REFERENCE]
        evaluate: ["score"],                                                       # + SAMPLES
    }[script]


TRAINERS = {"pretrain": pretrain, "diffusion": train_diffusion, "consistency": train_consistency}
WEIGHTS = {pretrain: ("model", "momentum"), train_diffusion: ("model", "ema"), train_consistency: ("model", "ema")}
OTHER_STAGE = {pretrain: "dm", train_diffusion: "rcm16", train_consistency: "dm"}   # a checkpoint of another stage


# ----------------------------------------------------------------------------------------------------------------
# Faults: kills during checkpoint writes, at random moments; the previous checkpoint survives; exact resume
# ----------------------------------------------------------------------------------------------------------------
TEAR = """
import io, os, runpy, signal, sys, torch
tear_at, real_save, calls = int(os.environ["TEAR_AT"]), torch.save, [0]
def torn_save(obj, f, *args, **kwargs):      # the TEAR_AT-th checkpoint write stops half-way: SIGKILL
    calls[0] += 1
    if calls[0] != tear_at:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

FAULT_STEPS = 8


@pytest.mark.parametrize("name", list(TRAINERS))
def test_kill_during_checkpoint_write_keeps_previous_and_resume_is_exact(name, files, tmp_path, monkeypatch, capsys):
    script = TRAINERS[name]
    args = base_args(script, files) + ["--steps", FAULT_STEPS, "--ckpt-every", 1, "--keep-every", 0]
    # the uninterrupted run keeps every step's checkpoint: the reference for whatever survives a kill
    code, _, err = cli(monkeypatch, capsys, script, args + ["--out", tmp_path / "straight", "--keep-every", 1])
    assert code == 0, err[-2000:]
    reference = lambda step: load(tmp_path / "straight" / f"ckpt_{step:07d}.pt")   # noqa: E731
    out = tmp_path / "killed"
    killed_in_write = 0

    # 1) SIGKILL in the middle of the 3rd checkpoint write (half of the bytes on disk)
    result = subprocess.run([sys.executable, "-c", TEAR, f"{script.__name__}.py", *map(str, args), "--out", out],
                            cwd=ROOT, env={**ENV, "TEAR_AT": "3"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = [f for f in os.listdir(out) if f.startswith("ckpt_last.pt.tmp-")]
    assert len(leftovers) == 1                                    # the torn temporary file ...
    with pytest.raises(Exception):
        load(out / leftovers[0])                                  # ... is unusable, but
    survivor = load(out / "ckpt_last.pt")                         # the previous checkpoint is intact:
    assert survivor["step"] == 2
    assert_same_state(survivor, reference(2), WEIGHTS[script], "after a torn write")
    killed_in_write += 1

    # 2) pretrain: more kills at seeded random moments after a checkpoint write, each may land in the next write
    if script is pretrain:
        rng = random.Random(1234)
        for _ in range(2):
            before = os.stat(out / "ckpt_last.pt").st_mtime_ns
            proc = subprocess.Popen([sys.executable, f"{script.__name__}.py", *map(str, args), "--out", out],
                                    cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and \
                    os.stat(out / "ckpt_last.pt").st_mtime_ns == before:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
            proc.kill()
            proc.wait()
            killed_in_write += any(f.startswith("ckpt_last.pt.tmp-") and f != leftovers[0] for f in os.listdir(out))
            survivor = load(out / "ckpt_last.pt")                 # always loads, always an uninterrupted state
            assert_same_state(survivor, reference(survivor["step"]), WEIGHTS[script], "after a random kill")

    # 3) rerun the same command: it resumes and ends bitwise where the uninterrupted run ends
    assert survivor["step"] < FAULT_STEPS, "every kill landed after the run had finished: resume was not exercised"
    code, stdout, err = cli(monkeypatch, capsys, script, args + ["--out", out])
    assert code == 0 and f"at step {survivor['step']}" in stdout, err[-2000:]
    assert_same_state(load(out / "ckpt_last.pt"), load(tmp_path / "straight" / "ckpt_last.pt"), WEIGHTS[script],
                      "final")
    assert not [f for f in os.listdir(out) if ".tmp-" in f]     # stale temporary files were cleaned up
    print(f"{name}: {killed_in_write} kill(s) landed inside a checkpoint write")


def test_resume_on_one_process_after_two_processes(files, tmp_path, monkeypatch, capsys, run_torchrun):
    """train_diffusion.py: 2 steps with torchrun on 2 processes, then 2 more on 1 process (same global batch) ==
    4 steps on 1 process, to float tolerance (gloo all-reduce sums in another order)."""
    args = base_args(train_diffusion, files) + ["--ckpt-every", 1, "--ema", 0.9, "--lr", 1e-3]
    code, _, err = cli(monkeypatch, capsys, train_diffusion, args + ["--steps", 4, "--out", tmp_path / "one"])
    assert code == 0, err[-2000:]
    result = run_torchrun(2, "train_diffusion.py", *args, "--steps", 2, "--out", tmp_path / "mixed")
    assert result.returncode == 0, result.stderr[-2000:]
    code, stdout, err = cli(monkeypatch, capsys, train_diffusion, args + ["--steps", 4, "--out", tmp_path / "mixed"])
    assert code == 0 and "at step 2" in stdout, err[-2000:]
    a, b = load(tmp_path / "one" / "ckpt_last.pt"), load(tmp_path / "mixed" / "ckpt_last.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{part}.{k}: {m}")
    moved = sum(not torch.equal(a["model"][k], load(files["rcm16"])["model"].get(k, a["model"][k]))
                for k in a["model"])
    assert moved > 10                                             # the comparison is not between untrained copies


@pytest.fixture(scope="module")
def finished_runs(files, tmp_path_factory):
    """A 2-step run of each training script (in-process), for the refused-resume tests."""
    root = tmp_path_factory.mktemp("finished")
    mp = pytest.MonkeyPatch()
    runs = {}
    try:
        for name, script in TRAINERS.items():
            runs[name] = root / name
            mp.setattr(sys, "argv", [f"{script.__name__}.py",
                                     *map(str, base_args(script, files) + ["--out", runs[name]])])
            rundir.cli_main(script.main)
    finally:
        mp.undo()
    return runs


@pytest.mark.parametrize("change", [["--model", "S"], ["--seed", 5], ["--batch-size", 8]],
                         ids=["model", "seed", "batch-size"])
@pytest.mark.parametrize("name", list(TRAINERS))
def test_resume_with_incompatible_arguments_is_refused_and_changes_nothing(name, change, finished_runs, files,
                                                                           tmp_path, monkeypatch, capsys):
    script = TRAINERS[name]
    out = tmp_path / "run"
    shutil.copytree(finished_runs[name], out)
    before, mtimes = snapshot(out), {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    code, _, err = cli(monkeypatch, capsys, script, base_args(script, files) + ["--steps", 4, "--out", out, *change])
    # consistency: an RCM-T --init does not fit EPG-S, which is found before the resume check: also a clear error
    assert_user_error(code, err, "cannot resume" if (name, change[0]) != ("consistency", "--model") else "does not fit")
    assert snapshot(out) == before
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == mtimes


LR_TO_NAN = {pretrain: 1e15, train_diffusion: 1e12, train_consistency: 1e12}   # pretrain scales lr by batch/1024


@pytest.mark.parametrize("name", list(TRAINERS))
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(name, files, tmp_path,
                                                                                  monkeypatch, capsys):
    script = TRAINERS[name]
    out = tmp_path / "run"
    args = base_args(script, files) + ["--steps", 4, "--ckpt-every", 1, "--lr", LR_TO_NAN[script], "--out", out]
    code, _, err = cli(monkeypatch, capsys, script, args)
    assert_user_error(code, err, "at or before step")
    step = int(re.search(r"at or before step (\d+)", err).group(1))
    state = load(out / "ckpt_last.pt")
    assert 1 <= state["step"] < step <= 4                        # the last good checkpoint, before the bad step
    for part in WEIGHTS[script]:
        assert all(v.isfinite().all() for v in state[part].values() if v.is_floating_point())


@pytest.mark.parametrize("name", list(TRAINERS))
def test_skip_nonfinite_finishes_with_a_finite_checkpoint(name, files, tmp_path, monkeypatch, capsys):
    script = TRAINERS[name]
    out = tmp_path / "run"
    args = base_args(script, files) + ["--steps", 4, "--ckpt-every", 1, "--lr", LR_TO_NAN[script], "--out", out,
                                       "--skip-nonfinite"]
    code, stdout, err = cli(monkeypatch, capsys, script, args)
    assert code == 0, err[-2000:]
    assert "optimiser step skipped" in stdout                   # the provocation did produce non-finite steps
    state = load(out / "ckpt_last.pt")
    assert state["step"] == 4                                    # the run reached its end and saved it
    for part in WEIGHTS[script]:
        assert all(v.isfinite().all() for v in state[part].values() if v.is_floating_point()), part
    assert all(torch.as_tensor(v).isfinite().all() for s in state["optimizer"]["state"].values() for v in s.values())


@pytest.mark.parametrize("name", [*TRAINERS, "sample"])
def test_unwritable_output_directory_is_reported_before_training(name, files, monkeypatch, capsys):
    """--out below a regular file cannot be created even by root (chmod would not stop root)."""
    script = TRAINERS.get(name, sample)
    out = os.path.join(files["regular_file"], "out")
    code, _, err = cli(monkeypatch, capsys, script, base_args(script, files) + ["--out", out])
    assert_user_error(code, err, "not writable")
    assert open(files["regular_file"]).read() == "a file, not a directory"


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one table, every script's command line; one line naming the problem, exit code 2, nothing written
# ----------------------------------------------------------------------------------------------------------------
def _trainer_cases():
    cases = []
    for name, script in TRAINERS.items():
        rows = [
            ("unknown-model", ["--model", "Q"], "Q"),
            ("zero-steps", ["--steps", 0], "--steps"),
            ("negative-steps", ["--steps", -3], "--steps"),
            ("zero-batch", ["--batch-size", 0], "--batch-size"),
            ("negative-batch", ["--batch-size", -8], "--batch-size"),
            ("batch-not-divisible-by-micro", ["--batch-size", 10, "--micro-batch", 4], "micro-batch"),
            ("image-size-not-divisible-by-patch", ["--image-size", 20], "not divisible by 8"),
            ("zero-lr", ["--lr", 0], "--lr"),
            ("data-missing", ["--data", "{data_missing}"], "does not exist"),
            ("data-empty", ["--data", "{data_empty}"], "no class sub-folders"),
            ("data-non-image-files", ["--data", "{data_text}"], "no images"),
            ("data-corrupt-images", ["--data", "{data_corrupt}"], "can be read"),
            ("data-truncated-images", ["--data", "{data_truncated}"], "can be read"),
            ("resume-from-another-stage", ["@ckpt_last.pt={%s}" % OTHER_STAGE[script]], "checkpoint is needed"),
            ("resume-from-corrupt-checkpoint", ["@ckpt_last.pt={garbage_ckpt}"], "corrupt"),
        ]
        if script is not pretrain:
            rows += [
                ("init-diffusion-checkpoint", ["--init", "{dm}"], "is a diffusion checkpoint"),
                ("init-rcm-of-another-size", ["--init", "{rcm32}"], "does not fit"),
                ("init-missing", ["--init", "{data_missing}"], "does not exist"),
                ("init-truncated", ["--init", "{truncated_ckpt}"], "corrupt"),
                ("init-and-from-scratch", ["--from-scratch"], "exclude each other"),
            ]
        cases += [pytest.param(name, extra, expected, id=f"{name}-{case}") for case, extra, expected in rows]
    return cases


BAD_INPUTS = _trainer_cases() + [pytest.param(script, extra, expected, id=f"{script}-{case}") for script, case, extra,
                                 expected in [
    ("sample", "zero-batch", ["--batch-size", 0], "--batch-size"),
    ("sample", "heun-one-step", ["--steps", 1], "--steps >= 2"),
    ("sample", "zero-steps", ["--steps", 0], "--steps must be positive"),
    ("sample", "checkpoint-is-a-directory", ["--ckpt", "{data_empty}"], "is a directory; pass a checkpoint file"),
    ("sample", "label-out-of-range", ["--labels", "12"], "out of range"),
    ("sample", "unknown-sampler", ["--sampler", "ddim"], "invalid choice"),
    ("sample", "checkpoint-of-another-size", ["--ckpt", "{dm_wrong_size}"], "do not match"),
    ("sample", "truncated-checkpoint", ["--ckpt", "{truncated_ckpt}"], "corrupt"),
    ("fid", "npz-wrong-key", ["{npz_wrong_key}", "{npz_good}"], "expected 'arr_0'"),
    ("fid", "npz-wrong-shape", ["{npz_wrong_shape}", "{npz_good}"], "(N, H, W, 3)"),
    ("fid", "npz-wrong-dtype", ["{npz_wrong_dtype}", "{npz_good}"], "must be uint8"),
    ("fid", "npz-truncated", ["{npz_truncated}", "{npz_good}"], "cannot read"),
    ("fid", "npz-not-an-npz", ["{npz_text}", "{npz_good}"], "cannot read"),
    ("fid", "samples-missing", ["{data_missing}", "{npz_good}"], "does not exist"),
    ("fid", "reference-missing", ["{npz_good}", "{data_missing}"], "does not exist"),
    ("fid", "inception-weights-missing", ["{npz_good}", "{npz_good}"], "not found"),
    ("fid", "zero-batch", ["{npz_good}", "{npz_good}", "--batch-size", 0], "--batch-size"),
    ("fid", "no-reference", ["{npz_good}"], "REFERENCE"),
    ("score", "npz-float-labels", ["{npz_wrong_labels}"], "integer label"),
    ("score", "npz-truncated", ["{npz_truncated}"], "cannot read"),
]]


@pytest.mark.parametrize("name,extra,expected", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_exit_code_2(name, extra, expected, files, tmp_path, monkeypatch, capsys):
    script = TRAINERS.get(name) or {"sample": sample, "fid": fid, "score": evaluate}[name]
    out = tmp_path / "out"
    argv = base_args(script, files)
    for item in extra:
        item = str(item).format(**files)
        if item.startswith("@"):                                 # a file placed in OUT before the run
            target, source = item[1:].split("=")
            out.mkdir(exist_ok=True)
            shutil.copy(source, out / target)
        else:
            argv.append(item)
    if script is fid:
        monkeypatch.delenv("EPG_INCEPTION", raising=False)
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    elif script is not evaluate:
        argv += ["--out", out]
    before = snapshot(out)
    code, _, err = cli(monkeypatch, capsys, script, argv)
    assert_user_error(code, err, expected)
    assert snapshot(out) == before                               # nothing written (and nothing overwritten)


# ----------------------------------------------------------------------------------------------------------------
# Round 2: pre-emption, resume that real jobs need, the kNN probe on small data, sampling that never loses a run
# ----------------------------------------------------------------------------------------------------------------
def metrics_steps(out):
    import json
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]


@pytest.mark.parametrize("name,signum", [("pretrain", signal.SIGTERM), ("diffusion", signal.SIGTERM),
                                         ("consistency", signal.SIGINT)])
def test_sigterm_saves_the_current_step_and_the_rerun_continues_bitwise(name, signum, files, tmp_path, monkeypatch,
                                                                        capsys):
    """A real SIGTERM (what SLURM and Kubernetes send) or SIGINT (Ctrl-C) mid-run: exit 143 or 130 with a message
    naming the checkpoint and its step, ckpt_last.pt at the step reached, and the rerun ends bitwise where the
    uninterrupted run ends, with no step logged twice."""
    script, steps = TRAINERS[name], 30
    args = base_args(script, files) + ["--steps", steps, "--ckpt-every", 1000]
    code, _, err = cli(monkeypatch, capsys, script, args + ["--out", tmp_path / "straight"])
    assert code == 0, err[-2000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, f"{script.__name__}.py", *map(str, args), "--out", out], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").exists() and len(metrics_steps(out)) >= 2):
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, f"not stopped mid-way (exit {proc.returncode}): {stderr[-2000:]}"
    stopped_at = load(out / "ckpt_last.pt")["step"]
    assert f"{signal.Signals(signum).name}: stopped after step {stopped_at}; {out}/ckpt_last.pt holds step " \
           f"{stopped_at}; rerun to resume" in stderr
    assert 2 <= stopped_at < steps                                # saved at the step reached, not at a cadence
    code, stdout, err = cli(monkeypatch, capsys, script, args + ["--out", out])
    assert code == 0 and f"at step {stopped_at}" in stdout, err[-2000:]
    assert_same_state(load(out / "ckpt_last.pt"), load(tmp_path / "straight" / "ckpt_last.pt"), WEIGHTS[script])
    assert metrics_steps(out) == list(range(1, steps + 1))       # nothing logged twice after the resume


def test_moved_data_resumes_and_changed_data_is_refused(files, tmp_path, monkeypatch, capsys):
    """A job that copies its data to scratch passes another --data path on every restart: same classes and image
    count resume (with a note); a data set that changed is refused."""
    for c in range(2):
        (tmp_path / "a" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.random.default_rng(10 * c + i).integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(
                tmp_path / "a" / f"class{c}" / f"{i}.png")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    args = base_args(pretrain, files) + ["--out", tmp_path / "run", "--batch-size", 4]
    code, _, err = cli(monkeypatch, capsys, pretrain, args + ["--data", tmp_path / "a"])
    assert code == 0, err[-2000:]
    code, stdout, err = cli(monkeypatch, capsys, pretrain, args + ["--data", tmp_path / "b", "--steps", 2])
    assert code == 0 and "nothing to do" in stdout and "data path changed" in err, err[-2000:]
    os.remove(tmp_path / "b" / "class1" / "5.png")
    code, _, err = cli(monkeypatch, capsys, pretrain, args + ["--data", tmp_path / "b"])
    assert_user_error(code, err, "classes or image count changed")


def test_changing_steps_on_resume_follows_one_rule(files, tmp_path, monkeypatch, capsys):
    """--steps may change on resume only where no schedule depends on it: pre-training (cosine, curriculum,
    temperature annealing) refuses; constant-lr diffusion continues to the new end."""
    for script, change_ok in ((pretrain, False), (train_diffusion, True)):
        out = tmp_path / script.__name__
        code, _, err = cli(monkeypatch, capsys, script, base_args(script, files) + ["--out", out])
        assert code == 0, err[-2000:]
        code, stdout, err = cli(monkeypatch, capsys, script, base_args(script, files) + ["--out", out, "--steps", 3])
        if change_ok:
            assert code == 0 and load(out / "ckpt_last.pt")["step"] == 3, err[-2000:]
            assert metrics_steps(out) == [1, 2, 3]
        else:
            assert_user_error(code, err, "--steps")


def test_knn_probe_on_an_image_folder_without_validation_split(files, tmp_path, monkeypatch, capsys):
    """50 images, no val/: the probe classifies a fixed fifth of them against a bank of the others (it used to
    classify a single image), and says how many of each it used."""
    for c in range(2):
        (tmp_path / "d" / f"c{c}").mkdir(parents=True)
        for i in range(25):
            colour = np.array([200, 30, 30] if c else [30, 30, 200], np.uint8)
            noise = np.random.default_rng(100 * c + i).integers(0, 40, (SIZE, SIZE, 3), np.uint8)
            Image.fromarray(colour + noise).save(tmp_path / "d" / f"c{c}" / f"{i}.png")
    args = base_args(pretrain, files) + ["--data", tmp_path / "d", "--probe-every", 1, "--steps", 1,
                                      "--out", tmp_path / "run"]
    code, stdout, err = cli(monkeypatch, capsys, pretrain, args)
    assert code == 0, err[-2000:]
    assert "40 bank images, 10 queries" in stdout
    import json
    probes = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if "probe_acc" in l]
    assert probes and all(p["probe_acc"] in [k / 10 for k in range(11)] for p in probes)   # 10 queries
    assert probes[0]["probe_acc"] >= 0.9                          # two colours: even a random encoder separates them
    (tmp_path / "one" / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "one" / "c0" / "0.png")
    code, _, err = cli(monkeypatch, capsys, pretrain, args[:-1] + [tmp_path / "run1", "--data", tmp_path / "one"])
    assert_user_error(code, err, "--probe-every 0")


def test_interrupted_sampling_draws_only_the_missing_chunks_and_ends_bitwise(files, tmp_path, monkeypatch, capsys):
    args = ["--ckpt", files["dm"], "--num-samples", 12, "--batch-size", 2, "--steps", 6, "--device", "cpu",
            "--no-progress", "--labels", "balanced"]
    code, _, err = cli(monkeypatch, capsys, sample, args + ["--out", tmp_path / "straight"])
    assert code == 0, err[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "sample.py", *map(str, args), "--out", out], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            (out / "chunks").exists() and len([f for f in os.listdir(out / "chunks") if f.endswith(".npy")]) >= 2):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sampler finished before the kill"
    done = len([f for f in os.listdir(out / "chunks") if f.endswith(".npy") and ".tmp" not in f])
    assert 2 <= done < 6 and not (out / "samples.npz").exists()
    code, stdout, err = cli(monkeypatch, capsys, sample, args + ["--out", out])
    assert code == 0 and f"{6 - done} of 6 chunks drawn by this run" in stdout, err[-2000:]
    a, b = np.load(tmp_path / "straight" / "samples.npz"), np.load(out / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert sorted(os.listdir(out)) == ["grid.png", "samples.npz", "settings.json"]
    code, _, err = cli(monkeypatch, capsys, sample, args + ["--out", out, "--seed", 1])   # other settings, same OUT:
    assert_user_error(code, err, "was drawn with other settings")  # never overwrites the finished samples.npz


@pytest.mark.parametrize("flags,expected", [(["--cfg-scale", "nan"], "--cfg-scale"),
                                            (["--cfg-interval", 1.0, 0.5], "--cfg-interval"),
                                            (["--cfg-interval", 0.2, "inf"], "--cfg-interval")])
def test_sampling_settings_that_would_give_garbage_are_refused(flags, expected, files, tmp_path, monkeypatch, capsys):
    args = ["--ckpt", files["dm"], "--num-samples", 2, "--steps", 2, "--device", "cpu", "--out", tmp_path / "o"]
    code, _, err = cli(monkeypatch, capsys, sample, args + flags)
    assert_user_error(code, err, expected)
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_nonfinite_weights_and_nonfinite_samples_stop_sampling(files, tmp_path, monkeypatch, capsys):
    state = load(files["dm"])
    state["ema"] = {k: v.clone() for k, v in state["ema"].items()}
    state["ema"]["out.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    args = ["--num-samples", 2, "--steps", 2, "--device", "cpu", "--out", tmp_path / "o"]
    code, _, err = cli(monkeypatch, capsys, sample, ["--ckpt", tmp_path / "nan.pt", *args])
    assert_user_error(code, err, "NaN or inf")
    code, _, err = cli(monkeypatch, capsys, sample, ["--ckpt", tmp_path / "nan.pt", "--weights", "online", *args])
    assert code == 0, err[-2000:]                                  # the online weights are finite
    state["ema"]["out.bias"][0] = 3e38                             # finite weights, infinite images
    state["ema"]["out.weight"].fill_(3e38)
    torch.save(state, tmp_path / "huge.pt")
    code, _, err = cli(monkeypatch, capsys, sample, ["--ckpt", tmp_path / "huge.pt", "--clamp", "none", *args[:-1],
                                                     tmp_path / "o2"])
    assert_user_error(code, err, "NaN/inf")
    assert not (tmp_path / "o2" / "samples.npz").exists()


def test_random_labels_follow_the_training_sets_class_counts():
    counts = [1000, 3000, 6000]
    labels = sample.class_labels("random", 30_000, 3, seed=2, class_counts=counts)
    share = np.bincount(labels.numpy(), minlength=3) / 30_000
    assert np.allclose(share, [0.1, 0.3, 0.6], atol=5 * math.sqrt(0.25 / 30_000))
    uniform = np.bincount(sample.class_labels("random", 30_000, 3, seed=2).numpy(), minlength=3) / 30_000
    assert np.allclose(uniform, 1 / 3, atol=5 * math.sqrt(0.25 / 30_000))


# ----------------------------------------------------------------------------------------------------------------
# Round 3: what a cluster run meets (requeue on another node, full disks, signals, torn files, torchrun)
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(folder, size):
    """A real small filesystem (tmpfs of `size`) mounted at `folder`; the test is skipped where none can be mounted."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)])


def fill(folder):
    """Write a filler file until the filesystem of `folder` is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)


HOLDER = ("import sys, time; sys.path.insert(0, {root!r}); import rundir; rundir.prepare_output({out!r}); "
          "print('locked', flush=True); time.sleep(60)")


def test_a_lock_of_another_node_holds_while_its_lease_is_renewed_and_is_taken_over_once_stale(tmp_path, monkeypatch,
                                                                                            capsys):
    """A run on host 'other' (a second UTS namespace) holds OUT: this host is refused for as long as it lives, even
    past the lease, which it renews; SIGKILLed, its lock is taken over once the lease is stale (a requeue on another
    node). An empty or garbage lock is taken over with a note, never a traceback nor refused forever."""
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode:
        pytest.skip("a second host name needs unshare --uts (root)")
    monkeypatch.setenv("EPG_LOCK_STALE_S", "1")                   # renewed every 0.2 s
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):           # not the same job (inside a SLURM CI job)
        monkeypatch.delenv(key, raising=False)
    out, lock = tmp_path / "out", tmp_path / "out" / ".lock"
    holder = subprocess.Popen(["unshare", "--uts", "sh", "-c", 'hostname other && exec "$@"', "sh", sys.executable,
                               "-c", HOLDER.format(root=ROOT, out=str(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert open(lock).read().split()[0] == "other"
        time.sleep(1.5)                                           # past the lease: only its renewal keeps it fresh
        with pytest.raises(rundir.UserError, match="in use by another run .host other"):
            rundir.prepare_output(str(out))
    finally:
        holder.kill()
        holder.wait()
    os.utime(lock, (time.time() - 2, time.time() - 2))            # the lease of the killed run runs out
    rundir.prepare_output(str(out))
    assert "taking over the lock of host other" in capsys.readouterr().err
    assert open(lock).read().split()[1] == str(os.getpid())
    rundir.release_locks()
    for garbage in (b"", b"\xff\x00 not a lock"):
        lock.write_bytes(garbage)
        rundir.prepare_output(str(out))
        assert "taking over the unreadable lock" in capsys.readouterr().err
        rundir.release_locks()


def test_a_full_disk_while_logging_stops_in_one_line_and_a_torn_log_never_blocks_the_resume(files, tmp_path,
                                                                                             monkeypatch, capsys):
    """A real full disk (tmpfs) under metrics.jsonl: one line, exit 2, no torn line, the checkpoint kept; a torn last
    line (what a write cut short leaves) is dropped with a note on resume, which ends where it should."""
    script = train_consistency
    with small_disk(tmp_path / "disk", "96m") as disk:
        args = base_args(script, files) + ["--ckpt-every", 1000, "--out", disk / "run"]
        code, _, err = cli(monkeypatch, capsys, script, args)    # 2 steps: ckpt_last.pt at step 2
        assert code == 0, err[-2000:]
        meter_init = trainlib.Meter.__init__

        def fill_the_disk_first(self, *a, **k):                  # the disk fills up just before the loop
            meter_init(self, *a, **k)
            fill(disk)
        monkeypatch.setattr(trainlib.Meter, "__init__", fill_the_disk_first)
        code, _, err = cli(monkeypatch, capsys, script, args + ["--steps", 40])
        monkeypatch.setattr(trainlib.Meter, "__init__", meter_init)
        assert_user_error(code, err, "metrics.jsonl' (No space left on device)")
        import json
        logged = [json.loads(line)["step"] for line in open(disk / "run" / "metrics.jsonl")]   # no torn line
        assert logged == list(range(1, len(logged) + 1)) and 2 < len(logged) < 40
        assert load(disk / "run" / "ckpt_last.pt")["step"] == 2
        os.remove(disk / "filler")
        with open(disk / "run" / "metrics.jsonl", "a") as f:
            f.write('{"step": 41, "loss": 0.')                    # a line cut short
        code, stdout, err = cli(monkeypatch, capsys, script, args + ["--steps", 4])
        assert code == 0 and "at step 2\n" in stdout and "dropped 1 unreadable line" in err, err[-2000:]
        assert metrics_steps(disk / "run") == [1, 2, 3, 4]


def sigterm_on_call(monkeypatch, module, name, n):
    """Patch module.name so that its n-th call first sends this process a real SIGTERM; returns the original."""
    original, calls = getattr(module, name), []

    def signalled(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)
    monkeypatch.setattr(module, name, signalled)
    return original


def test_sigterm_stops_sampling_after_the_current_chunk_and_broken_chunks_are_drawn_again(files, tmp_path,
                                                                                          monkeypatch, capsys):
    """A real SIGTERM to this process in the middle of the 4th chunk: exit 143 after that chunk. Chunks that a crash
    without fsync leaves (cut short, empty, of another shape) are drawn again, and the result is bitwise that of an
    uninterrupted run."""
    args = ["--ckpt", files["dm"], "--num-samples", 12, "--batch-size", 2, "--steps", 2, "--device", "cpu",
            "--no-progress", "--labels", "balanced"]
    code, _, err = cli(monkeypatch, capsys, sample, args + ["--out", tmp_path / "straight"])
    assert code == 0, err[-2000:]
    generate = sigterm_on_call(monkeypatch, evaluate, "generate", 4)
    out, chunks = tmp_path / "run", tmp_path / "run" / "chunks"
    code, _, err = cli(monkeypatch, capsys, sample, args + ["--out", out])
    assert code == 143 and f"SIGTERM: stopped with 4 of 6 chunks in {chunks}; rerun" in err, err[-2000:]
    assert sorted(f for f in os.listdir(chunks) if f.endswith(".npy")) == [f"{c:06d}.npy" for c in range(4)]
    blob = (chunks / "000000.npy").read_bytes()
    (chunks / "000000.npy").write_bytes(blob[:len(blob) // 2])
    (chunks / "000001.npy").write_bytes(b"")
    np.save(chunks / "000002.npy", np.zeros((2, 8, 8, 3), np.uint8))
    monkeypatch.setattr(evaluate, "generate", generate)
    code, stdout, err = cli(monkeypatch, capsys, sample, args + ["--out", out])
    assert code == 0 and "5 of 6 chunks drawn by this run" in stdout and err.count("drawing it again") == 3, err
    a, b = np.load(tmp_path / "straight" / "samples.npz"), np.load(out / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_sigterm_in_the_last_evaluation_stops_it_and_the_rerun_redoes_it_once(files, tmp_path, monkeypatch, capsys,
                                                                              classifier_cache):
    """train_diffusion.py after its last step: a real SIGTERM during the evaluation's first chunk of samples stops it
    with exit 143 and a true message, no record written; the rerun evaluates once and writes the grid."""
    monkeypatch.setenv("EPG_CACHE", str(classifier_cache))       # the 32 px reference classifier, trained once
    out = tmp_path / "run"
    args = base_args(train_diffusion, files) + ["--image-size", 32, "--init", files["rcm32"], "--eval-samples", 10,
                                                "--out", out]
    generate = sigterm_on_call(monkeypatch, evaluate, "generate", 1)
    code, _, err = cli(monkeypatch, capsys, train_diffusion, args)
    assert code == 143 and "SIGTERM: stopped in the evaluation of step 2" in err, err[-2000:]
    assert load(out / "ckpt_last.pt")["step"] == 2 and not (out / "samples_0000002.png").exists()
    assert not any("eval_seconds" in line for line in open(out / "metrics.jsonl"))
    monkeypatch.setattr(evaluate, "generate", generate)
    code, stdout, err = cli(monkeypatch, capsys, train_diffusion, args)
    assert code == 0 and "nothing to do" in stdout and "evaluation at step 2" in stdout, err[-2000:]
    assert (out / "samples_0000002.png").exists()
    import json
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "eval_seconds" in line] == [2]


def test_a_corrupt_last_checkpoint_is_caught_by_its_checksum_and_the_newest_intact_one_resumes(files, tmp_path,
                                                                                                monkeypatch, capsys):
    """One flipped byte in ckpt_last.pt (torch.load alone reads it without a word): the sha256 written beside it at
    save time refuses it, the resume falls back to the newest intact ckpt_<step>.pt with a note and ends bitwise
    where the uninterrupted run ends; with none left, one line that does not point at the conversion tool."""
    script = train_consistency
    args = base_args(script, files) + ["--steps", 4, "--ckpt-every", 1, "--keep-every", 2]
    code, _, err = cli(monkeypatch, capsys, script, args + ["--out", tmp_path / "straight"])
    assert code == 0, err[-2000:]
    out = tmp_path / "run"                                        # a run whose last save went wrong after step 2
    shutil.copytree(tmp_path / "straight", out)
    os.remove(out / "ckpt_0000004.pt")

    def flip_a_byte():
        blob = bytearray((out / "ckpt_last.pt").read_bytes())
        blob[len(blob) // 2] ^= 0x10
        (out / "ckpt_last.pt").write_bytes(blob)
    flip_a_byte()
    assert load(out / "ckpt_last.pt")["step"] == 4                # torch.load does not notice
    with pytest.raises(rundir.UserError, match="does not match the sha256"):
        rundir.load_checkpoint(str(out / "ckpt_last.pt"))
    code, stdout, err = cli(monkeypatch, capsys, script, args + ["--out", out])
    assert code == 0 and f"resuming from {out}/ckpt_0000002.pt (step 2) instead" in err, err[-2000:]
    assert f"resumed from {out}/ckpt_0000002.pt at step 2" in stdout
    assert_same_state(load(out / "ckpt_last.pt"), load(tmp_path / "straight" / "ckpt_last.pt"), WEIGHTS[script])
    flip_a_byte()
    for kept in ("ckpt_0000002.pt", "ckpt_0000004.pt"):
        os.remove(out / kept)
    code, _, err = cli(monkeypatch, capsys, script, args + ["--steps", 5, "--out", out])
    assert_user_error(code, err, "holds no intact ckpt_<step>.pt")
    assert "official.py" not in err


def test_class_folders_without_images_and_symlink_loops_are_one_line(tmp_path):
    """An empty class folder or a symlink to the root would be a class with 0 images (and 'balanced' sampling would
    give it its share); a symlink loop among the images was a traceback."""
    root = tmp_path / "d"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / name / "0.png")
    (root / "empty").mkdir()
    (root / "loop").symlink_to(root)
    with pytest.raises(rundir.UserError, match="class folders without images in .*: empty, loop;"):
        data.ImageFolder(root, SIZE)
    (root / "empty").rmdir()
    (root / "loop").unlink()
    (root / "a" / "x.png").symlink_to("y.png")
    (root / "a" / "y.png").symlink_to("x.png")
    with pytest.raises(rundir.UserError, match=r"cannot read .*[xy]\.png \(Too many levels of symbolic links\)"):
        data.ImageFolder(root, SIZE)


def test_score_checks_its_destination_before_scoring(files, tmp_path, monkeypatch, capsys):
    """evaluate.py score --out into a missing folder or onto a full disk (tmpfs): one line, exit 2, before any work
    (the reference classifier, trained into --cache-dir otherwise, is never built)."""
    args = ["score", files["npz_good"], "--cache-dir", tmp_path / "cache"]
    code, _, err = cli(monkeypatch, capsys, evaluate, args + ["--out", tmp_path / "missing" / "m.json"])
    assert_user_error(code, err, "does not exist")
    with small_disk(tmp_path / "disk", "64k") as disk:
        fill(disk)
        code, _, err = cli(monkeypatch, capsys, evaluate, args + ["--out", disk / "m.json"])
        assert_user_error(code, err, "MB free")
        assert os.listdir(disk) == ["filler"]
    assert not (tmp_path / "cache").exists()


def test_a_class_free_checkpoint_samples_its_null_row(tmp_path, monkeypatch, capsys):
    """An official class-free EPG (as the released one-step EPG-L/16, here at model T) converted with
    tools/official.py: the default labels sample it unconditionally (its null row), explicit labels are refused."""
    from test_official import official, official_epg
    cfg = models.model_config("T")
    class_free = official_epg(cfg["depth"], cfg["enc_dim"], cfg["dec_dim"], 4, 32, num_classes=None,
                              generator=torch.Generator().manual_seed(0))
    torch.save(class_free, tmp_path / "nnet_ema.pth")
    monkeypatch.setitem(official.RELEASED_GENERATORS, ("T", 32), ("consistency", None))
    official.main(["convert", str(tmp_path), str(tmp_path / "epg.pt")])
    assert load(tmp_path / "epg.pt")["config"]["num_classes"] == 0
    args = ["--ckpt", tmp_path / "epg.pt", "--num-samples", 4, "--batch-size", 2, "--device", "cpu", "--no-progress"]
    for labels in ([], ["--labels", "balanced"]):
        code, stdout, err = cli(monkeypatch, capsys, sample, args + labels + ["--out", tmp_path / f"s{len(labels)}"])
        assert code == 0 and "consistency, 1 steps" in stdout, err[-2000:]
        result = np.load(tmp_path / f"s{len(labels)}" / "samples.npz")
        assert result["arr_0"].shape == (4, 32, 32, 3) and not result["arr_1"].any()
    code, _, err = cli(monkeypatch, capsys, sample, args + ["--labels", "3", "--out", tmp_path / "t"])
    assert_user_error(code, err, "class-free")


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT asks for a save at the end of the step; a second one does not wait for it."""
    trainlib.init_distributed("cpu")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert rundir.preempted(trainlib.Env(0, 1, 0, torch.device("cpu"))) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


SLOW_SAVE = """
import runpy, sys, time, torch
import rundir
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):        # the save that a stop request triggers takes a minute
    if rundir._STOP["signal"]:
        f.write(b"partial")
        f.flush()
        time.sleep(60)
    return real_save(obj, f, *args, **kwargs)
torch.save = slow_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_torchrun_killed_in_a_slow_save_claims_nothing_and_the_same_command_finishes_the_run(files, tmp_path,
                                                                                             monkeypatch, capsys,
                                                                                             run_torchrun):
    """2 processes under torchrun, SIGTERM to torchrun while its checkpoint write takes longer than torchrun's
    shutdown timeout: torchrun SIGKILLs rank 0 in the middle of the save. No rank may claim a checkpoint it did not
    write; the previous ckpt_last.pt is intact, and rerunning the same command (the restart path; --max-restarts is
    not used) ends where an uninterrupted run ends (1 process, to float tolerance: gloo sums in another order)."""
    from conftest import free_port
    args = base_args(train_consistency, files) + ["--steps", 8, "--ckpt-every", 2]
    code, _, err = cli(monkeypatch, capsys, train_consistency, args + ["--out", tmp_path / "one"])
    assert code == 0, err[-2000:]
    (tmp_path / "slow_save.py").write_text(SLOW_SAVE)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", tmp_path / "slow_save.py",
                             "train_consistency.py", *map(str, args), "--out", out], cwd=ROOT,
                            env={**ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "ckpt_last.pt").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "forcefully exiting via 9" in stderr, stderr[-3000:]   # torchrun did SIGKILL a rank mid-save
    assert "rerun to resume" not in stderr and "holds step" not in stderr, stderr[-3000:]
    survivor = load(out / "ckpt_last.pt")
    assert 2 <= survivor["step"] < 8
    result = run_torchrun(2, "train_consistency.py", *args, "--out", out)
    assert result.returncode == 0 and f"at step {survivor['step']}\n" in result.stdout, result.stderr[-2000:]
    a, b = load(tmp_path / "one" / "ckpt_last.pt"), load(out / "ckpt_last.pt")
    assert a["step"] == b["step"] == 8
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{part}.{k}: {m}")


STOP_WITH_A_SLOW_SAVE = """
import os, signal, sys, time, types
sys.path.insert(0, {root!r})
import rundir
import trainlib
env = trainlib.init_distributed("cpu")
os.kill(os.getpid(), signal.SIGTERM)

def state():                                   # rank 0's checkpoint write takes 2 s
    time.sleep(2)
    return {{"stage": "pretrain", "config": {{}}, "step": 3}}
try:
    rundir.checkpoint(env, types.SimpleNamespace(out=sys.argv[1], ckpt_every=100, steps=10, keep_every=0), 3, state)
except rundir.Preempted:
    print(time.time())
"""


def test_on_a_stop_no_rank_leaves_before_rank_0_has_saved(tmp_path):
    """torchrun stops the other ranks with a fixed 30 s grace once one rank has exited: the ranks that save nothing
    wait for rank 0's save (2 processes, gloo, a real SIGTERM each)."""
    from conftest import free_port
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", STOP_WITH_A_SLOW_SAVE.format(root=ROOT), tmp_path],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    left = [float(p.communicate(timeout=120)[0]) for p in procs]
    assert load(tmp_path / "ckpt_last.pt")["step"] == 3
    assert left[1] >= left[0] - 0.5                              # rank 1 left when rank 0 had saved, not 2 s before


@pytest.mark.parametrize("rank,local_rank,error,code,said", [
    ("1", "1", rundir.UserError("bad flag"), 2, False),       # a second process of a node: quiet
    ("2", "0", rundir.UserError("bad flag"), 2, True),        # the first process of another node: one line there
    ("2", "0", rundir.Preempted(signal.SIGTERM, "holds"), 143, False)])   # only rank 0 saved the checkpoint
def test_under_torchrun_an_error_is_said_once_per_node_and_a_preemption_by_rank_0(rank, local_rank, error, code,
                                                                                  said, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    def main():
        raise error
    with pytest.raises(SystemExit) as exit_info:
        rundir.cli_main(main)
    assert exit_info.value.code == code and bool(capsys.readouterr().err) == said
