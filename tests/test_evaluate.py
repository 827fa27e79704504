"""The online evaluation (evaluate.Evaluator, --eval-every) and tools/curves.py: records at the right steps and equal
to sample.py + evaluate.py score of the same checkpoint; training bitwise the same with and without evaluation; 2
processes == 1; bad inputs refused before the first step; the curves drawn are the records' series."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import rundir
import train_consistency
import train_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import curves  # noqa: E402

TINY = ["--model", "T", "--from-scratch", "--batch-size", 4, "--log-every", 1, "--ckpt-every", 100, "--device", "cpu"]


SMALL = dict(PROBE_BANK=200, PROBE_QUERIES=100, HELDOUT_IMAGES=100)     # the probe's and held-out sets, for speed


@pytest.fixture(autouse=True)
def cache(classifier_cache, monkeypatch):
    monkeypatch.setenv("EPG_CACHE", str(classifier_cache))      # the 32 px reference classifier, trained once
    for name, value in SMALL.items():
        monkeypatch.setattr(evaluate, name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(script, *argv):
    """script.main(argv) in this process -> exit code (0, or 2 for a user error)."""
    try:
        rundir.cli_main(lambda: script.main([str(a) for a in argv]))
    except SystemExit as e:
        return e.code
    return 0


def records(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, classifier_cache):
    """Diffusion EPG-T, 6 steps, evaluated every 3 steps with 20 samples (Heun-3, the T preset's recorded guidance)."""
    os.environ["EPG_CACHE"] = str(classifier_cache)
    out = tmp_path_factory.mktemp("eval") / "run"
    torch.set_num_threads(1)                   # as every test here: the bitwise comparison needs the same threads
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SMALL.items():
            patch.setattr(evaluate, name, value)
        assert run(train_diffusion, *TINY, "--steps", 6, "--eval-every", 3, "--eval-samples", 20, "--sample-steps",
                   3, "--keep-every", 3, "--out", out) == 0
    return out


def test_evaluations_are_logged_at_their_steps_once_with_every_measurement(evaluated):
    evals = [r for r in records(evaluated) if "eval_seconds" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["eval_samples"] == 20 and 0 <= r["class_acc"] <= 1 and r["fd_ref"] > 0
        assert 0 <= r["probe_acc"] <= 1 and r["heldout_loss"] > 0
        assert sorted(k for k in r if k.startswith("heldout_mse")) == [
            "heldout_mse_t0-0.1", "heldout_mse_t0.1-1", "heldout_mse_t1-10", "heldout_mse_t10-inf"]
    assert [r["step"] for r in records(evaluated) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (evaluated / "samples_0000006.png").exists()


def test_an_evaluation_scores_what_sample_py_and_evaluate_score_give_for_its_checkpoint(evaluated, tmp_path):
    """The record of step 3 against the independent path: sample.py on ckpt_0000003.pt (balanced labels, the
    recorded guidance, Heun-3), then `evaluate.py score` of its samples.npz."""
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", evaluated / "ckpt_0000003.pt", "--num-samples", "20",
                        "--labels", "balanced", "--steps", "3", "--out", tmp_path / "s", "--device", "cpu",
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    expected = evaluate.score(tmp_path / "s" / "samples.npz")
    record = next(r for r in records(evaluated) if r.get("eval_seconds") and r["step"] == 3)
    assert record["class_acc"] == pytest.approx(expected["class_acc"], abs=1e-9)
    assert record["fd_ref"] == pytest.approx(expected["fd_ref"], rel=1e-4)


def test_training_with_evaluations_is_bitwise_training_without(evaluated, tmp_path):
    out = tmp_path / "plain"
    assert run(train_diffusion, *TINY, "--steps", 6, "--eval-samples", 0, "--sample-every", 0, "--out", out) == 0
    losses = lambda o: [(r["step"], r["loss"], r["grad_norm"]) for r in records(o) if "loss" in r]  # noqa: E731
    assert losses(out) == losses(evaluated)
    a, b = (torch.load(o / "ckpt_last.pt", weights_only=True) for o in (out, evaluated))
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_two_processes_evaluate_as_one(tmp_path, run_torchrun, classifier_cache):
    """torchrun with 2 processes: each draws half of the samples, the features are gathered; the record equals the
    single process's (both train bitwise alike, the run being independent of the number of processes)."""
    argv = [*TINY, "--steps", 2, "--eval-samples", 10, "--sample-steps", 2]
    assert run(train_diffusion, *argv, "--out", tmp_path / "one") == 0
    r = run_torchrun(2, "train_diffusion.py", *argv, "--out", tmp_path / "two", env={"EPG_CACHE": classifier_cache})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([r for r in records(tmp_path / o) if "eval_seconds" in r] for o in ("one", "two"))
    assert len(one) == len(two) == 1
    for key in ("class_acc", "fd_ref"):            # the gathered ones (rank 0 alone probes, on the full sets there)
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-6), key


def test_consistency_evaluates_one_and_two_steps(tmp_path):
    out = tmp_path / "cm"
    assert run(train_consistency, *TINY, "--steps", 2, "--eval-samples", 10, "--sampling", '{"mid_sigma": 1.526}',
               "--out", out) == 0
    (r,) = [r for r in records(out) if "eval_seconds" in r]
    assert r["step"] == 2 and {"class_acc", "fd_ref", "class_acc_2step", "fd_ref_2step", "probe_acc"} <= set(r)
    assert "heldout_loss" not in r and (out / "samples_0000002.png").exists()


def test_eval_cfg_scores_each_scale_from_the_same_noise(tmp_path):
    """--eval-cfg 1 3: a key per scale; scale 1 is unguided, so it equals a run whose recorded guidance is off."""
    argv = [*TINY, "--steps", 1, "--eval-samples", 10, "--sample-steps", 2]
    assert run(train_diffusion, *argv, "--eval-cfg", 1, 3, "--out", tmp_path / "a") == 0
    assert run(train_diffusion, *argv, "--sampling", '{"cfg_scale": 1.0}', "--out", tmp_path / "b") == 0
    (a,), (b,) = ([r for r in records(tmp_path / o) if "eval_seconds" in r] for o in "ab")
    assert {"class_acc_cfg1", "fd_ref_cfg1", "class_acc_cfg3", "fd_ref_cfg3"} <= set(a) and "fd_ref" not in a
    assert a["fd_ref_cfg1"] == b["fd_ref"] and a["fd_ref_cfg3"] != b["fd_ref"]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["no reference", "reference size", "reference format", "inception missing"])
def test_bad_evaluation_inputs_fail_before_the_first_step(case, image_folder, tmp_path, capsys):
    np.savez(tmp_path / "ref16.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "ref32.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    extra, message = {
        "no reference": ([], "needs --eval-ref"),
        "reference size": (["--eval-ref", tmp_path / "ref16.npz", "--inception", tmp_path / "w.pth"], "16x16"),
        "reference format": (["--eval-ref", tmp_path / "bad.npz", "--inception", tmp_path / "w.pth"], "expected"),
        "inception missing": (["--eval-ref", tmp_path / "ref32.npz", "--inception", tmp_path / "none.pth"],
                              "does not exist"),
    }[case]
    if case != "inception missing":
        (tmp_path / "w.pth").write_bytes(b"")
    out = tmp_path / "out"
    code = run(train_diffusion, *TINY, "--data", image_folder, "--steps", 3, "--eval-every", 1, *extra, "--out", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "ckpt_last.pt").exists() and not (out / "metrics.jsonl").exists()


def test_curves_draws_the_series_of_metrics_jsonl(tmp_path):
    """Two hand-written runs: each panel's lines are their records (the last record of a step wins, torn lines are
    skipped); --x images scales by the batch, --x flops adds the pre-training's compute; a PNG is written."""
    for name, batch, init_flops, rows in (("rcm", 8, 1000.0, [(2, 0.3), (4, 0.5), (4, 0.6)]),
                                          ("scratch", 4, 0.0, [(2, 0.2), (4, 0.4)])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"batch_size": batch, "train_flops": 10.0,
                                                        "init_flops": init_flops, "stage": "diffusion"}))
        with open(folder / "metrics.jsonl", "w") as f:
            for step, acc in rows:
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
                f.write(json.dumps({"step": step, "class_acc": acc, "eval_seconds": 1.0}) + "\n")
            f.write('{"step": 6, "class_a')
    runs = {n: curves.read_run(tmp_path / n) for n in ("rcm", "scratch")}
    for x, expected in (("step", {"rcm": [(2, 0.3), (4, 0.6)], "scratch": [(2, 0.2), (4, 0.4)]}),
                        ("images", {"rcm": [(16, 0.3), (32, 0.6)], "scratch": [(8, 0.2), (16, 0.4)]}),
                        ("flops", {"rcm": [(1020, 0.3), (1040, 0.6)], "scratch": [(20, 0.2), (40, 0.4)]})):
        fig = curves.plot(runs, ["class_acc", "loss"], x)
        lines = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()}
        assert lines == {k: [list(map(float, p)) for p in v] for k, v in expected.items()}, x
        assert len(fig.axes[1].get_lines()) == 2 and fig.axes[0].get_title() == "class_acc"
    png = tmp_path / "c.png"
    assert curves.main([str(tmp_path / "rcm"), str(tmp_path / "scratch"), "--x", "flops", "--out", str(png)]) is None
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
    with pytest.raises(rundir.UserError, match="no run logs fid"):
        curves.main([str(tmp_path / "rcm"), "--metric", "fid", "--out", str(png)])
    assert math.isclose(curves.series(*runs["rcm"], "loss")[0][1], 0.5)
