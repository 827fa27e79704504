"""README.md and BENCHMARKS.md cite nothing that does not exist: every `--flag` resolves against the parser of the
script it is given to (or of some script, or torchrun's), every file path and link target (with its #anchor) exists,
and every `module.name` of a project module is an attribute of it. Runs in seconds: parsers are captured, not run."""
import argparse
import contextlib
import functools
import importlib.util
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
from torch.distributed.run import get_args_parser

from conftest import ROOT

DOCS = ("README.md", "BENCHMARKS.md")
FOREIGN_FLAGS = {"--signal"}          # SLURM's sbatch option, named in README's multi-node note
REPO_SUFFIXES = (".py", ".md", ".png", ".yml", ".txt")


def repo_files():
    """Paths of the repository's files, relative to ROOT (git's list where there is one, else a walk)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return set(listed.stdout.split("\n")) - {""}
    return {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs}


def scripts():
    """Every project script, relative to ROOT (the top level and tools/)."""
    return sorted(f for f in repo_files() if f.endswith(".py") and os.path.dirname(f) in ("", "tools"))


@functools.lru_cache(maxsize=None)
def load(path):
    name = os.path.splitext(os.path.basename(path))[0]
    if os.path.dirname(path) == "":
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parser(Exception):
    def __init__(self, parser):
        self.parser = parser


def option_strings(parser):
    """Every option string of a parser and of its sub-commands."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def captured_flags(path):
    """The option strings of a script's command line: its main() runs until it parses, then stops there."""
    with open(os.path.join(ROOT, path)) as f:
        if "parse_args" not in f.read():                          # models.py: main() prints a table
            return None
    module = load(path)
    if not hasattr(module, "main"):
        return None

    def capture(parser, *args, **kwargs):
        raise _Parser(parser)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(sys, "argv", [path]), contextlib.suppress(SystemExit):
        try:
            module.main()
        except _Parser as e:
            return option_strings(e.parser)
    return None


@pytest.fixture(scope="module")
def flags():
    found = {path: captured_flags(path) for path in scripts()}
    return {path: f for path, f in found.items() if f}


def doc_text(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def spans(text):
    """Code spans and the lines of fenced blocks (a line ending in a backslash joined to the next)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    lines = [line for block in fenced for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    inline = [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]     # may span lines
    return lines + inline


def test_the_parsers_are_found(flags):
    # a change in how the scripts parse must not silently empty this test
    for script in ("pretrain.py", "train_diffusion.py", "train_consistency.py", "sample.py", "fid.py",
                   "tools/bench.py", "tools/prepare.py", "tools/official.py"):
        assert script in flags and "--help" in flags[script], script
    assert "--lr" in flags["pretrain.py"] and "--aux-ckpt" in flags["train_consistency.py"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_exists(doc, flags):
    torchrun = set(get_args_parser()._option_string_actions)
    anywhere = set().union(*flags.values()) | torchrun | FOREIGN_FLAGS
    by_name = {os.path.basename(path): f for path, f in flags.items()} | flags
    missing = []
    for span in spans(doc_text(doc)):
        script, before = None, True
        for token in span.split():
            if token.endswith(".py") and token in by_name:
                script, before = token, False
            for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", token):
                known = by_name[script] if script and not before else anywhere
                if flag not in known:
                    missing.append(f"{flag} ({script or 'any script'}) in `{span.strip()}`")
    assert not missing, "\n".join(missing)


def heading_anchors(text):
    """GitHub's anchors of a markdown file's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_and_link_exists(doc):
    text, files = doc_text(doc), repo_files()
    names = {os.path.basename(f) for f in files}
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):                           # markdown links
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        path = path or doc
        if path not in files and not os.path.isdir(os.path.join(ROOT, path)):
            missing.append(f"link {target}")
        elif anchor and anchor not in heading_anchors(doc_text(path)):
            missing.append(f"anchor {target}")
    for span in spans(text):
        for command in re.findall(r"python3? (\S+\.py)", span):                    # a command: from the root
            if command not in files:
                missing.append(f"`python {command}`")
    for token in re.findall(r"(?<![\w/.:-])([\w][\w./-]*\.(?:py|md|png|yml|txt))\b", text):
        if "/" in token and not token.startswith(("docs/", "tools/", "tests/")):
            continue                                                               # runs/..., /data/...: outputs
        if token not in files and ("/" in token or token not in names):
            missing.append(token)
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS)
def test_every_module_name_exists(doc):
    modules = {os.path.splitext(os.path.basename(path))[0]: path for path in scripts()}
    missing = []
    for module, name in set(re.findall(r"(?<![\w./-])(\w+)\.([A-Za-z_]\w*)", doc_text(doc))):
        if module in modules and name not in ("py",) and not hasattr(load(modules[module]), name):
            missing.append(f"{module}.{name}")
    assert not missing, "\n".join(sorted(missing))
