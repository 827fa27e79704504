"""trainlib.py: atomic checkpoints, clear errors, batch arithmetic, schedules, EMA (closed forms and invariants)."""
import math
import os

import pytest
import torch

import rundir
import trainlib


def test_checkpoint_roundtrip_weights_only(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rundir.save_checkpoint(path, {"stage": "diffusion", "config": {"model": "T"}, "step": 3,
                                    "model": model.state_dict(), "optimizer": opt.state_dict()})
    state = rundir.load_checkpoint(path, stage="diffusion")          # weights_only=True inside
    assert state["step"] == 3 and torch.equal(state["model"]["weight"], model.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.sha256"]  # no temporary file left behind


def test_a_kill_between_the_checkpoint_rename_and_its_checksum_record_loses_nothing(tmp_path, monkeypatch):
    """ckpt.pt.sha256 names the old and the new file while the new one is renamed into place, so that a kill
    between the rename and the final record leaves a checkpoint that loads (and still one that is checked)."""
    path = str(tmp_path / "ckpt.pt")
    rundir.save_checkpoint(path, {"stage": "pretrain", "config": {}, "step": 1, "w": torch.zeros(3)})
    record = rundir._record_digests

    def killed_after_the_rename(p, digests):
        if len(digests) == 1:                                          # the final record: the process dies here
            raise SystemExit("killed")
        record(p, digests)
    monkeypatch.setattr(rundir, "_record_digests", killed_after_the_rename)
    with pytest.raises(SystemExit):
        rundir.save_checkpoint(path, {"stage": "pretrain", "config": {}, "step": 2, "w": torch.ones(3)})
    assert rundir.load_checkpoint(path)["step"] == 2
    with open(path, "r+b") as f:                                       # the record still catches a flipped byte
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(rundir.UserError, match="does not match the sha256"):
        rundir.load_checkpoint(path)


FULL_DISK = """
import os, resource, signal, sys, torch
sys.path.insert(0, {root!r})
import rundir
folder, limit = sys.argv[1], int(sys.argv[2])
if limit:                                            # no small filesystem to mount: a file-size limit instead
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
path = os.path.join(folder, "ckpt_last.pt")
rundir.save_checkpoint(path, {{"stage": "pretrain", "config": {{}}, "step": 1, "w": torch.ones(20_000)}})
try:
    rundir.save_checkpoint(path, {{"stage": "pretrain", "config": {{}}, "step": 2, "w": torch.ones(2_000_000)}})
except rundir.UserError as e:
    print(e)
    try:
        rundir.prepare_output(os.path.join(folder, "run"))    # the rerun's own write test on the full disk
    except rundir.UserError as e:
        print(e)
"""


def test_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path):
    """A real full disk: a 1 MiB tmpfs where this process may mount one, else RLIMIT_FSIZE (SIGXFSZ ignored), so
    that torch.save's zip writer fails as it does on a full disk (RuntimeError, not OSError)."""
    import subprocess
    import sys
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=root), str(folder),
                                 "0" if mounted else str(1 << 20)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "could not write checkpoint" in result.stdout and "previous checkpoint is intact" in result.stdout
        state = rundir.load_checkpoint(str(folder / "ckpt_last.pt"))
        assert state["step"] == 1 and torch.equal(state["w"], torch.ones(20_000))
        leftovers = [n for n in os.listdir(folder) if ".tmp-" in n or ".write-test-" in n]
        leftovers += [n for n in os.listdir(folder / "run") if ".write-test-" in n] if (folder / "run").exists() else []
        assert leftovers == []
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)])


def test_a_second_run_on_the_same_output_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {root!r}); "
                               f"import rundir; rundir.prepare_output({str(tmp_path / 'out')!r}); "
                               f"print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.UserError, match=f"in use by another run .*pid {holder.pid}"):
            rundir.prepare_output(str(tmp_path / "out"))
    finally:
        holder.kill()
        holder.wait()
    rundir.prepare_output(str(tmp_path / "out"))                    # the holder died: its lock is taken over
    assert f"dead run (pid {holder.pid})" in capsys.readouterr().err
    assert open(tmp_path / "out" / ".lock").read().split()[1] == str(os.getpid())


def test_corrupt_or_foreign_checkpoint_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(rundir.UserError, match="corrupt"):
        rundir.load_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(1)}, foreign)
    with pytest.raises(rundir.UserError, match="not a checkpoint of this project"):
        rundir.load_checkpoint(str(foreign))
    other = tmp_path / "pt.pt"
    rundir.save_checkpoint(str(other), {"stage": "pretrain", "config": {}, "step": 0})
    with pytest.raises(rundir.UserError, match="pretrain checkpoint"):
        rundir.load_checkpoint(str(other), stage="diffusion")
    with pytest.raises(rundir.UserError, match="does not exist"):
        rundir.load_checkpoint(str(tmp_path / "missing.pt"))


def test_split_batch():
    assert trainlib.split_batch(1024, 8) == (128, 128, 1)
    assert trainlib.split_batch(1024, 8, 32) == (128, 32, 4)
    with pytest.raises(rundir.UserError, match="not divisible by the world size"):
        trainlib.split_batch(1000, 3)
    with pytest.raises(rundir.UserError, match="micro-batch"):
        trainlib.split_batch(1024, 8, 48)


def test_warmup_cosine_closed_form():
    assert trainlib.warmup_cosine(0, 100, 1.0, warmup=10) == 0.0
    assert trainlib.warmup_cosine(5, 100, 1.0, warmup=10) == 0.5
    assert trainlib.warmup_cosine(10, 100, 1.0, warmup=10) == 1.0
    assert trainlib.warmup_cosine(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert trainlib.warmup_cosine(100, 100, 1.0, warmup=10) == pytest.approx(0.0, abs=1e-12)
    assert trainlib.warmup_cosine(25, 100, 2.0) == pytest.approx(1 + math.cos(math.pi / 4))


def test_ema_update_relation():
    torch.manual_seed(0)
    ema, model = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    e0 = ema.weight.detach().clone()
    trainlib.ema_update(ema, model, 0.99)
    assert torch.allclose(ema.weight, 0.99 * e0 + 0.01 * model.weight)


def test_adamw_no_decay_groups():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(3))
            self.lin = torch.nn.Linear(2, 2)
    opt = trainlib.adamw(M(), 1e-4, (0.9, 0.999), 0.01, no_decay=("pos_embed",))
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 1), (0.01, 2)]


def test_unwritable_output_dir_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(rundir.UserError, match="not writable"):
        rundir.prepare_output(str(blocker / "sub"))


def test_step_generators_are_reproducible_and_distinct():
    a = torch.randn(5, generator=trainlib.step_generator(0, 7, "cpu"))
    b = torch.randn(5, generator=trainlib.step_generator(0, 7, "cpu"))
    c = torch.randn(5, generator=trainlib.step_generator(0, 8, "cpu"))
    d = torch.randn(5, generator=trainlib.step_generator(0, 7, "cpu", stream=1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("script", ["pretrain", "train_diffusion", "train_consistency"])
def test_every_config_key_is_a_flag_with_its_comment_as_help_and_presets_show_in_help(script):
    """The CONFIG block is the one source of each hyper-parameter: every key has a flag whose help is the key's
    comment in the source, and `--model T --help` shows the T preset's values as the defaults."""
    import importlib
    import re
    import subprocess
    import sys
    module = importlib.import_module(script)
    source = open(module.__file__).read()
    block = source[source.index("CONFIG = dict("):source.index("\n)\n", source.index("CONFIG = dict("))]
    out = subprocess.run([sys.executable, module.__file__, "--model", "T", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    options = {}  # flag -> its help text, whitespace collapsed
    for chunk in re.split(r"\n(?=  -)", out.partition("options:")[2]):
        flag, _, text = " ".join(chunk.split()).partition(" ")
        options[flag.rstrip(",")] = text
    for key in module.CONFIG:
        line = next(l for l in block.splitlines() if re.search(rf"\b{key}=", l))
        comment = line.partition("#")[2].strip()
        assert comment, f"{key} has no comment in CONFIG"
        text = options["--" + key.replace("_", "-")]
        assert " ".join(comment.split()[:3]) in text, (key, text)
        shown = module.PRESETS["T"].get(key, module.CONFIG[key])
        if not isinstance(shown, (list, tuple, dict)):
            assert f"(default: {shown})" in text, (key, text)


@pytest.mark.parametrize("script", ["pretrain", "train_diffusion", "train_consistency"])
def test_paper_sizes_need_data_and_the_shapes_are_asked_for_by_name(script):
    """Without --data, --model T trains on the embedded shapes and every other size stops: one line naming
    tools/prepare.py and the explicit --data shapes; --data shapes (the embedded set at any size) is honoured."""
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(rundir.UserError) as e:
        module.parse_args(["--model", "B"])
    message = str(e.value)
    assert "\n" not in message and "tools/prepare.py" in message and "--data shapes" in message
    assert module.parse_args(["--model", "B", "--data", "shapes"]).data is None      # None: the embedded data set
    assert module.parse_args(["--model", "T"]).data is None
    assert module.parse_args(["--model", "B", "--data", "/data/in256"]).data == "/data/in256"


@pytest.mark.parametrize("script", ["pretrain", "train_diffusion", "train_consistency"])
def test_each_script_declares_its_ranges_and_resumable_keys_beside_config(script):
    """The ranges checked by trainlib.parse and the keys a resume may change are the script's own declarations,
    and name keys of its CONFIG (a misspelt one would check nothing); a value outside its range is refused."""
    import importlib
    module = importlib.import_module(script)
    evaluation = {"eval_every", "eval_samples", "eval_cfg", "eval_ref", "inception", "sample_every", "sample_steps"}
    for name in ("POSITIVE", "NON_NEGATIVE", "FRACTION"):
        assert set(getattr(module, name)) <= set(module.CONFIG), name
    assert set(module.MAY_CHANGE) <= set(module.CONFIG) | evaluation
    assert {"out", "steps", "ckpt_every", "log_every"} <= set(module.MAY_CHANGE)
    assert not {"model", "lr", "batch_size", "image_size"} & set(module.MAY_CHANGE)
    for key, bad in ((module.POSITIVE[0], 0), (module.NON_NEGATIVE[0], -1), (module.FRACTION[0], 1)):
        with pytest.raises(rundir.UserError, match=f"--{key.replace('_', '-')} must be"):
            module.parse_args(["--model", "T", f"--{key.replace('_', '-')}", str(bad)])


def test_code_fingerprint_follows_the_code(tmp_path):
    """The fingerprint hashes the stage's script with the shared modules (an edit changes it, the same code gives
    the same value) and names git HEAD where there is one."""
    import shutil
    import subprocess
    root = os.path.dirname(os.path.abspath(trainlib.__file__))
    script = tmp_path / "train_diffusion.py"
    shutil.copy(os.path.join(root, "train_diffusion.py"), script)
    same = trainlib.code_fingerprint(os.path.join(root, "train_diffusion.py"))
    assert trainlib.code_fingerprint(str(script)) == same and len(same["sha256"]) == 64
    with open(script, "a") as f:
        f.write("# an edit\n")
    assert trainlib.code_fingerprint(str(script))["sha256"] != same["sha256"]
    assert trainlib.code_fingerprint(os.path.join(root, "pretrain.py"))["sha256"] != same["sha256"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    assert same["git"] == (head.stdout.strip() if head.returncode == 0 else None)
