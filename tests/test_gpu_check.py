"""tools/gpu_check.py on CPU: every phase at tiny size end to end (what `make gpu-check` runs at paper size on a GPU),
and the judgement of a run from its checkpoint and logged losses."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
import rundir  # noqa: E402


def test_every_phase_runs_on_cpu_and_prints_the_summary(tmp_path, classifier_cache):
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
        benchmarks = f.read()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "EPG_CACHE": str(classifier_cache)}
    result = subprocess.run([sys.executable, os.path.join("tools", "gpu_check.py"), "--device", "cpu", "--out",
                             str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    table = result.stdout.split("| check | result | seconds | detail |")[1]
    for check in ("| pytest tests/test_gpu.py | ok |", "| pretrain RCM-T, 6 steps | ok |",
                  "| pretrain rerun: no step redone | ok |", "| pretrain resumed at step 3 in a new OUT | ok |",
                  "| diffusion EPG-T, 6 steps | ok |", "| consistency EPG-T, 6 steps | ok |", "| bench all T | ok |",
                  "| pretrain RCM-T, 3 steps, 2 processes (gloo) = 1 process | ok |"):
        assert check in table, check
    assert "FAIL" not in table and "agree to 0.0e+00 relative" in table      # resume on CPU: bitwise losses
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
        assert f.read() == benchmarks                                         # nothing recorded on CPU


def test_a_run_is_judged_on_its_checkpoint_its_logged_steps_and_where_required_its_loss_trend(tmp_path):
    rundir.save_checkpoint(str(tmp_path / "ckpt_last.pt"), {"stage": "pretrain", "config": {}, "step": 6})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in enumerate([3.0, 3.0, 3.0, 4.0, 4.0, 5.0], start=1):
            f.write(json.dumps({"step": step, "loss": loss, "images_per_s": 10.0, "peak_mem_gb": 1.5}) + "\n")
    assert gpu_check.judge_run(str(tmp_path), 6, trend=False)("").startswith("loss 3 -> 4.5")
    with pytest.raises(gpu_check.Failed, match="did not fall"):
        gpu_check.judge_run(str(tmp_path), 6)("")
    with pytest.raises(gpu_check.Failed, match="checkpoint at step 6"):
        gpu_check.judge_run(str(tmp_path), 7, trend=False)("")
    with pytest.raises(gpu_check.Failed, match="expected 6, 4..6"):               # a resumed run logs only 4..6
        gpu_check.judge_run(str(tmp_path), 6, trend=False, resumed_at=3)("resumed from x at step 3")


def test_the_losses_of_two_runs_are_compared_step_by_step(tmp_path):
    for name, start, losses in (("ref", 1, [1.0, 2.0, 4.0]), ("same", 2, [2.0, 4.0]), ("off", 2, [2.0, 4.1]),
                                ("late", 3, [4.0, 8.0])):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, loss in enumerate(losses, start=start):
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    assert "2 logged losses agree to 0.0e+00" in gpu_check.judge_same_losses(tmp_path / "ref", tmp_path / "same", 0)("")
    with pytest.raises(gpu_check.Failed, match=r"differ by 2\.50e-02"):             # 4.1 / 4 - 1
        gpu_check.judge_same_losses(tmp_path / "ref", tmp_path / "off", 1e-3)("")
    with pytest.raises(gpu_check.Failed, match=r"steps \[3, 4\] are not among"):
        gpu_check.judge_same_losses(tmp_path / "ref", tmp_path / "late", 1e-3)("")
