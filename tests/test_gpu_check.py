"""gpu_check.py on CPU: every phase at tiny size end to end (what `make gpu-check` runs at paper size on a GPU), and
the reading of bench.py's memory table."""
import json
import os
import subprocess
import sys

import pytest

import gpu_check
import trainlib
from conftest import ROOT

MEMORY_TABLE = """memory per GPU at 64 images per GPU, GiB (estimate; BENCHMARKS.md)
| stage | model | params | grads | AdamW | EMA/momentum/W | activations | total | fits in 80 GB? |
| pretrain | RCM-B/16 @256 | 0.4 | 0.4 | 0.8 | 0.4 | 6.0 | 8.0 | yes |
| diffusion | EPG-L/16 @256 | 2.0 | 2.0 | 4.0 | 2.0 | 20.0 | 30.0 | yes |
| diffusion | EPG-XL/16 @256 | 2.2 | 2.2 | 4.3 | 2.2 | 29.1 | 40.0 | yes |
| diffusion | EPG-L/32 @512 | 2.0 | 2.0 | 4.0 | 2.0 | 22.0 | 32.0 | yes |
"""


def test_every_phase_runs_on_cpu_and_prints_the_summary(tmp_path):
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
        benchmarks = f.read()
    result = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    table = result.stdout.split("| check | result | seconds | detail |")[1]
    for check in ("| pytest tests/test_gpu.py | ok |", "| pretrain RCM-T, 6 steps | ok |",
                  "| pretrain rerun: nothing to do | ok |", "| pretrain resumed at step 3 in a new OUT | ok |",
                  "| diffusion EPG-T, 6 steps | ok |", "| consistency EPG-T, 6 steps | ok |", "| bench all T | ok |",
                  "| pretrain RCM-T, 3 steps, 2 processes (gloo) = 1 process | ok |"):
        assert check in table, check
    assert "FAIL" not in table and "agree to 0.0e+00 relative" in table      # resume on CPU: bitwise losses
    with open(os.path.join(ROOT, "BENCHMARKS.md")) as f:
        assert f.read() == benchmarks                                         # nothing recorded on CPU


def test_memory_estimates_are_read_per_stage_model_and_size(tmp_path):
    estimates, batch = gpu_check.memory_table(MEMORY_TABLE)
    assert batch == 64 and estimates[("diffusion", "EPG-XL/16 @256")] == 40.0
    checks = gpu_check.Checks(cuda=False, out=str(tmp_path), budget=None)
    checks.bench_rows = [f"| {stage} | {run} | H100 | bf16 | 64 | 900.0 | 300.0 | 50.0 | {peak} GiB | abc | today |"
                         for stage, run, peak in (("diffusion", "XL@256", 44.0), ("diffusion", "L@256", 33.0),
                                                  ("diffusion", "L@512", 60.0), ("pretrain", "B@256", 20.0),
                                                  ("sampling", "XL@256", 9.0))]
    gpu_check.compare_memory(checks, estimates, batch, 64)
    assert [row[1] for row in checks.rows] == ["ok", "ok", "FAIL", "FAIL", "skip"]     # 1.10, 1.10 (not XL, not
    assert "= 1.10" in checks.rows[1][3] and "= 1.88" in checks.rows[2][3]              # L/32), 1.88, 2.50, none
    gpu_check.compare_memory(checks, estimates, batch, 128)
    assert [row[1] for row in checks.rows[5:]] == ["skip"] * 5                          # estimated for another batch


def test_a_run_is_judged_on_its_checkpoint_its_logged_steps_and_where_required_its_loss_trend(tmp_path):
    trainlib.save_checkpoint(str(tmp_path / "ckpt_last.pt"), {"stage": "pretrain", "config": {}, "step": 6})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in enumerate([3.0, 3.0, 3.0, 4.0, 4.0, 5.0], start=1):
            f.write(json.dumps({"step": step, "loss": loss, "images_per_s": 10.0}) + "\n")
    assert gpu_check.judge_run(str(tmp_path), 6, trend=False)("").startswith("loss 3 -> 4.5")
    with pytest.raises(gpu_check.Failed, match="did not fall"):
        gpu_check.judge_run(str(tmp_path), 6)("")
    with pytest.raises(gpu_check.Failed, match="checkpoint at step 6"):
        gpu_check.judge_run(str(tmp_path), 7, trend=False)("")
    with pytest.raises(gpu_check.Failed, match="expected 6, 4..6"):               # a resumed run logs only 4..6
        gpu_check.judge_run(str(tmp_path), 6, trend=False, resumed_at=3)("resumed from x at step 3")
