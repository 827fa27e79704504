"""`make demo`'s pipeline end to end (demo.py --quick: every stage for a few steps), checking what it promises to write.

The full demo's quality figures are recorded in BENCHMARKS.md; this smoke test only checks that the pipeline runs
and reports consistent results (it takes about two minutes on 2 cores, mostly start-up and the reference classifier).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_demo_runs_every_stage_and_writes_grids_and_metrics(tmp_path, classifier_cache):
    out = tmp_path / "demo"
    env = {**os.environ, "EPG_CACHE": str(classifier_cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("samples_dm/grid.png", "samples_cm/grid.png", "summary.json", "summary.md"):
        assert (out / path).is_file(), path
    summary = json.loads((out / "summary.json").read_text())
    for key in ("diffusion_heun16", "consistency_one_step"):
        assert 0.0 <= summary[key]["class_acc"] <= 1.0 and summary[key]["fd_ref"] >= 0.0
    assert 0.0 <= summary["probe_acc_pretrained"] <= 1.0
    assert "NOT comparable to Inception FID" in summary["note"]
    assert "not Inception FID" in result.stdout
