"""Shared test helpers: the repository root on sys.path and a torchrun launcher for CPU (gloo) multi-process tests."""
import fcntl
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script, *args, timeout=300, env=None):
    """Run `torchrun --nproc_per_node=nproc script args` on CPU (gloo) from the repository root; returns the result."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", script, *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True)


@pytest.fixture
def run_torchrun():
    return torchrun


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """The 32x32 reference classifier of shapes.py, trained once per test session into a temporary cache (shared by
    the tests that score samples, which would otherwise each train it). Under pytest-xdist the workers share it: the
    first trains it while the others wait on the lock, then read it."""
    import evaluate
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "epg_cache"
    cache.mkdir(exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        evaluate.reference_classifier(32, cache_dir=cache)
    return cache
