"""Every network pass of a training step goes through torch.compile (issue: the momentum branch, the stop-gradient
targets and the frozen auxiliary network too): three steps of each stage with --compile, traced by dynamo
(backend aot_eager here: the same graphs as inductor without its code generation, which `make gpu-check` runs);
no graph break, and no graph compiled after the first step."""
import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import models
import pretrain
import train_consistency
import train_diffusion
import rundir

SIZE = 16
# the compiled call sites of one step: pretrain online (fwd + bwd), momentum, sg target; diffusion the network;
# consistency the target pass (no_grad), the online pass, W's keys (no_grad) and W on the prediction; each
# fine-tuning run adds the EMA network of its final grid (evaluate.Evaluator)
GRAPHS = {"pretrain": 3, "diffusion": 2, "consistency": 5}


@pytest.fixture(scope="module")
def rcm(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("rcm") / "rcm.pt")
    rundir.save_checkpoint(path, {"stage": "pretrain", "config": {"model": "T", "image_size": SIZE},
                                    "step": 0, "model": models.build_rcm("T", SIZE).state_dict()})
    return path


def compiled_graphs(name, steps, rcm, out, monkeypatch):
    """Run `steps` steps of a stage with --compile in this process; returns (graphs compiled, graph breaks)."""
    script = {"pretrain": pretrain, "diffusion": train_diffusion, "consistency": train_consistency}[name]
    args = ["--model", "T", "--image-size", SIZE, "--batch-size", 4, "--steps", steps, "--compile", "--out", out,
            "--device", "cpu"]
    args += {"pretrain": ["--probe-every", 0], "diffusion": ["--init", rcm, "--sample-every", 0, "--eval-samples", 0,
                                                               "--sample-steps", 2],       # a cheap final grid
             "consistency": ["--init", rcm, "--eval-samples", 0]}[name]
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    rundir.cli_main(lambda: script.main([str(a) for a in args]))
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("name", list(GRAPHS))
def test_every_pass_is_compiled_without_graph_breaks_or_recompilation(name, rcm, tmp_path, monkeypatch):
    # each pass compiled once, in one piece: a pass left eager counts one graph short, a pass compiled again in steps 2
    # and 3 one graph over
    assert compiled_graphs(name, 3, rcm, tmp_path, monkeypatch) == (GRAPHS[name], 0)
