"""The benchmarks in bench/ keep working, so that no documented command breaks unseen.

- each benchmark's quick mode runs as a user runs it (`python bench/X.py --quick --json FILE`,
  a real process): exit 0, every row its defaults promise (cases, sensitivities, methods,
  gatings), every number finite, and positive where it is a time, a rate or a loss;
- bench/check_gpu.py, which needs CUDA: without a device, ONE line and exit 2; its CPU half
  (`--reference PATH`, the fp32 reference it compares the GPU against) runs and is complete;
- every bench command written in the docs (code blocks of README.md, docs/*.md) and in the
  scripts' own docstrings parses with that script's argument parser.

No speed is asserted. The runs start together, one thread each, when the first test needs
them, and each test collects its own, so the file takes about as long as the slowest run
(~20-40 s on 2 cores).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, NamedTuple, Tuple

import pytest

from tests.test_docs import commands, user_docs
from tests.tool_runner import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_SCRIPT = re.compile(r"(?:^|/)(bench/[\w.-]+\.py)$")
TIMEOUT = 600

# name -> (script, arguments); "{out}" is the run's output file.
RUNS = {
    "layer": ("bench/bench_layer.py", ["--quick", "--backward", "--json", "{out}"]),
    # Label steps too (every other step), so the labelled path of the model is timed.
    "train_step": ("bench/bench_train_step.py",
                   ["--quick", "--label-fraction", "0.5", "--json", "{out}"]),
    "upcycle": ("bench/bench_upcycle.py", ["--quick", "--json", "{out}"]),
    "adaptive": ("bench/bench_adaptive.py", ["--quick", "--json", "{out}"]),
    # The fine-tuning recipe study: one variant (a fine-tune and an evaluation, real tools).
    "recipe_study": ("bench/recipe_study.py", ["--quick", "--variants", "base",
                                               "--output-dir", "{out}.d", "--json", "{out}"]),
    # The GPU benchmark's code path at tiny sizes on the CPU.
    "gpu_bench": ("bench/gpu_bench.py", ["--quick", "--json", "{out}"]),
    "gpu_reference": ("bench/check_gpu.py", ["--reference", "{out}"]),
    "gpu_without_device": ("bench/check_gpu.py", []),
}
QUICK_SCRIPTS = ("bench/bench_layer.py", "bench/bench_train_step.py", "bench/bench_upcycle.py",
                 "bench/bench_adaptive.py", "bench/recipe_study.py", "bench/gpu_bench.py")


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    out: str        # the output file the run was given

    def json(self):
        with open(self.out) as f:
            return json.load(f)


# The run each test reads (the fixture starts those of the selected tests together).
TEST_RUN = {
    "test_bench_layer_quick_backward": "layer",
    "test_bench_train_step_quick": "train_step",
    "test_bench_upcycle_quick": "upcycle",
    "test_bench_adaptive_quick": "adaptive",
    "test_recipe_study_quick": "recipe_study",
    "test_check_gpu_without_a_device_says_so_in_one_line": "gpu_without_device",
    "test_check_gpu_cpu_reference": "gpu_reference",
}


class _Runs:
    """Runs of RUNS as real processes (one thread each, no GPU, each its own folder and
    TMPDIR), started by `start` side by side; `result(name)` waits for one (starting it if
    it was not)."""

    def __init__(self, root):
        self.root = root
        self.procs: Dict[str, Tuple[subprocess.Popen, str, str]] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                 "MASTER_PORT")}
        self.env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")

    def start(self, names) -> None:
        for name in names:
            if name in self.procs:
                continue
            script, args = RUNS[name]
            folder = self.root / name
            folder.mkdir()
            out = str(folder / ("reference.pt" if name == "gpu_reference" else "out.json"))
            with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, os.path.join(REPO, script),
                     *[a.replace("{out}", out) for a in args]],
                    cwd=REPO, env=dict(self.env, TMPDIR=str(folder)), stdout=stdout,
                    stderr=stderr)
            self.procs[name] = (proc, str(folder), out)

    def result(self, name: str) -> Run:
        self.start([name])
        proc, folder, out = self.procs[name]
        proc.wait(timeout=TIMEOUT)
        with open(os.path.join(folder, "stdout")) as f, \
                open(os.path.join(folder, "stderr")) as g:
            return Run(proc.returncode, f.read(), g.read(), out)

    def close(self) -> None:
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    started = _Runs(tmp_path_factory.mktemp("bench"))
    started.start(TEST_RUN[item.name] for item in request.session.items
                  if item.module is request.module and item.name in TEST_RUN)
    yield started
    started.close()


def _ok(run: Run) -> None:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"


def _finite(row: dict, keys, positive=True) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, row)
        assert value > 0 if positive else value >= 0, (key, row)


def _table_lines(stdout: str, first_cells) -> None:
    """Each expected row name starts a line of the printed table."""
    lines = stdout.splitlines()
    for cell in first_cells:
        assert any(re.match(rf"^\|? ?{re.escape(cell)}(\s|\s*\|)", line) for line in lines), \
            (cell, stdout)


# ------------------------------------------------------------------------ parsers

class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


_PARSERS: Dict[str, argparse.ArgumentParser] = {}


def bench_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser a bench script's `main` builds, taken at the moment it would parse
    (nothing after that runs)."""
    if script not in _PARSERS:
        module = load_script(script)
        saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

        def grab(self, *args, **kwargs):
            raise _Captured(self)

        argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = grab
        try:
            module.main([])
        except _Captured as captured:
            _PARSERS[script] = captured.parser
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
        assert script in _PARSERS, f"{script}: main() parsed no arguments"
    return _PARSERS[script]


def default(script: str, option: str):
    return bench_parser(script).get_default(option)


# ------------------------------------------------------------------------ quick modes

def test_bench_layer_quick_backward(runs):
    run = runs.result("layer")
    _ok(run)
    rows = run.json()
    fractions = (0.25, 0.5, 0.75, 1.0)
    cases = [f"uniform f={f:.2f}" for f in fractions] + ["mixed levels"]
    assert [r["case"] for r in rows] == cases
    for r in rows:
        _finite(r, ("ffn_fraction", "dense_ms", "layer_ms", "ratio", "target", "train_ratio",
                    "layer_train_ms", "dense_train_ms"))
        assert isinstance(r["meets_target"], bool)
        assert r["ffn_fraction"] <= 1.0
    # Uniform router levels: theta = f puts every token at FFN fraction f.
    for f, r in zip(fractions, rows):
        assert r["ffn_fraction"] == pytest.approx(f), r
    _table_lines(run.stdout, cases)
    label = re.search(r"^label step .*: ([0-9.eE+-]+) x dense$", run.stdout, flags=re.M)
    assert label and math.isfinite(float(label.group(1))) and float(label.group(1)) > 0, \
        run.stdout


def test_gpu_bench_quick(runs):
    """Both parts' rows, every number finite; zero routers put every token at the asked FFN
    fraction (the layer rows measure it); TFLOP/s follow the step's model FLOPs."""
    run = runs.result("gpu_bench")
    _ok(run)
    data = run.json()
    assert data["device"] == "cpu" and data["quick"]
    cases = ["dense"] + [f"DynaMoE f={f:g}" for f in (0.25, 0.5, 0.75, 1.0)]
    assert [r["case"] for r in data["training"]] == cases
    for r in data["training"]:
        _finite(r, ("seconds_per_iter", "tokens_per_s", "tflops", "vs_dense", "planner_gib"))
        assert r["planner_gib"] > 0 and r["mfu"] is None and r["peak_memory_gib"] is None
    assert data["training"][0]["vs_dense"] == 1.0
    assert [r["ffn_fraction"] for r in data["layer"]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for r in data["layer"]:
        _finite(r, ("dense_ms", "layer_ms", "ratio", "target"))
        assert r["target"] == pytest.approx(r["ffn_fraction"] + 0.05)


def test_bench_train_step_quick(runs):
    run = runs.result("train_step")
    _ok(run)
    rows = run.json()
    sensitivities = default("bench/bench_train_step.py", "sensitivities").split(",")
    cases = ["dense"] + [f"theta={t}" for t in sensitivities]
    assert [r["case"] for r in rows] == cases
    for r in rows:
        _finite(r, ("seconds_per_iter", "tokens_per_s", "ratio_to_dense"))
    assert rows[0]["ratio_to_dense"] == 1.0
    _table_lines(run.stdout, cases)


def test_bench_upcycle_quick(runs):
    run = runs.result("upcycle")
    _ok(run)
    rows = run.json()
    script = "bench/bench_upcycle.py"
    experts = default(script, "experts")
    adaptive = f"adaptive T={default(script, 'threshold')}"
    stds = [float(s) for s in default(script, "logit_stds").split(",")]
    methods = default(script, "methods").split(",")
    expected = [("dense", "-", "-")]
    if "replicate" in methods:
        expected += [("replicate", "random (any)", g) for g in (adaptive, "top-2")]
    for method in ("split-importance", "split-coactivation"):
        if method in methods:
            expected.append((method, "uniform", f"top-{experts}"))
            for std in (stds if method == "split-coactivation" else stds[:1]):
                expected += [(method, f"fitted, logit std {std}", g) for g in ("top-2", adaptive)]
    assert [(r["method"], r["router"], r["gating"]) for r in rows] == expected
    for r in rows:
        _finite(r, ("max_rel", "mean_rel_l2"), positive=False)
        _finite(r, ("perplexity", "ffn_fraction"))
        if r["method"] != "dense":
            _finite(r, ("experts_per_token",))
            assert r["experts_per_token"] <= experts, r
        # Function-preserving starts: a replicated FFN, or all split experts at equal weight.
        if r["method"] == "replicate" or r["router"] == "uniform":
            assert r["max_rel"] < 1e-4, r
    assert len(re.findall(r"^\| (dense|replicate|split-\w+) \|", run.stdout, flags=re.M)) \
        == len(rows), run.stdout


def test_bench_adaptive_quick(runs):
    run = runs.result("adaptive")
    _ok(run)
    result = run.json()
    gatings = ["top-2", f"adaptive T={default('bench/bench_adaptive.py', 'threshold')}"]
    assert [(r["gating"], r["curriculum"]) for r in result["rows"]] == \
        [(g, c) for g in gatings for c in (False, True)]
    for r in result["rows"]:
        _finite(r, ("seconds_per_iter", "tokens_per_s", "experts_per_token_train",
                    "ffn_gflop_per_token", "experts_per_token_held_out", "train_loss_last5",
                    "held_out_loss", "tokens"))
        assert 1.0 <= r["experts_per_token_train"] <= 2.0, r
    _finite(result, ("dense_held_out_loss",))
    assert sorted(result["upcycled"]) == sorted(gatings)
    for loss, experts in result["upcycled"].values():
        assert math.isfinite(loss) and loss > 0 and 1.0 <= experts <= 2.0
    for g in gatings:
        for c in ("no", "yes"):
            assert f"| {g} | {c} |" in run.stdout, run.stdout


def test_recipe_study_quick(runs, tmp_path):
    run = runs.result("recipe_study")
    _ok(run)
    study = run.json()
    assert [r["variant"] for r in study["rows"]] == ["base"]
    row = study["rows"][0]
    _finite(row, ("train_seconds", "eval_seconds", "perplexity", "dense_perplexity",
                  "perplexity_ood", "dense_perplexity_ood", "lambada_perplexity"))
    # The ratios are the model's perplexity over the dense model's, on each text.
    assert row["perplexity_vs_dense"] == pytest.approx(row["perplexity"]
                                                       / row["dense_perplexity"], rel=1e-12)
    assert row["perplexity_ood_vs_dense"] == pytest.approx(
        row["perplexity_ood"] / row["dense_perplexity_ood"], rel=1e-12)
    # The main job's recipe: distillation from the dense checkpoint, the main job's theta.
    assert "--dynamoe-distill-teacher" in row["train_command"]
    from megatron_dynamoe.cli.demo import parse_args as main_job_args

    theta_min = main_job_args([]).sensitivity_min
    assert f"--dynamoe-sensitivity-min {theta_min}" in row["train_command"], row
    # Measured at the budget on the held-out text (the budget solved on calibration text).
    budget = float(default("bench/recipe_study.py", "ffn_budget"))
    assert 0.0 < row["ffn_fraction"] <= 1.0 and abs(row["ffn_fraction"] - budget) < 0.1, row
    assert "| base |" in run.stdout, run.stdout

    # A later call whose variants are all done builds no job (this --job does not exist) and
    # tables every variant finished in the folder, an earlier call's included (one planted).
    study_dir = run.out + ".d"
    os.makedirs(os.path.join(study_dir, "theta-0.5-1"))
    with open(os.path.join(study_dir, "theta-0.5-1", "result.json"), "w") as f:
        json.dump(dict(row, variant="theta-0.5-1"), f)
    again = str(tmp_path / "again.json")
    assert load_script("bench/recipe_study.py").main(
        ["--job", str(tmp_path / "no-job"), "--variants", "base", "--output-dir", study_dir,
         "--json", again]) == 0
    with open(again) as f:
        assert [r["variant"] for r in json.load(f)["rows"]] == ["base", "theta-0.5-1"]
    with open(os.path.join(study_dir, "study.md")) as f:
        assert "| theta-0.5-1 |" in f.read()


def test_check_gpu_without_a_device_says_so_in_one_line(runs):
    run = runs.result("gpu_without_device")
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], run.stderr


def test_check_gpu_cpu_reference(runs):
    import torch

    run = runs.result("gpu_reference")
    _ok(run)
    reference = torch.load(run.out, weights_only=False)
    assert sorted(reference["runs"]) == [False, True]       # routed, labelled
    grads = {}
    for labelled, (logits, loss, grad, routing) in reference["runs"].items():
        assert torch.isfinite(logits).all() and math.isfinite(loss) and loss > 0
        assert grad and all(torch.isfinite(g).all() for g in grad.values())
        assert len(routing) >= 1
        for levels, per_expert in routing:
            assert levels.sum() == logits.shape[0] * logits.shape[1]   # every token routed
            assert (per_expert >= 0).all()
        grads[labelled] = set(grad)
    # A labelled forward trains the routers (residual-relative labels through the model).
    assert any("router" in n for n in grads[True] - grads[False]), grads
    assert len(reference["fit_losses"]) >= 1
    assert all(math.isfinite(x) and x > 0 for x in reference["fit_losses"])


# ------------------------------------------------------------------------ documented commands

def _docstring_commands(script: str) -> List[Tuple[str, List[str]]]:
    """(where, words) of the shell commands in a bench script's module docstring."""
    with open(os.path.join(REPO, script)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    found, logical, start = [], "", None
    for number, line in enumerate(doc.splitlines(), 1):
        start = start or number
        if line.rstrip().endswith("\\"):          # a continued command
            logical += line.rstrip()[:-1] + " "
            continue
        logical, line, start_line, start = "", logical + line, start, None
        if re.search(r"\bbench/[\w.-]+\.py\b", line) and re.match(
                r"^\s*(python|torchrun)\b", line):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            found.append((f"{script} docstring line {start_line}", list(lexer)))
    return found


def documented_bench_commands() -> List[Tuple[str, str, List[str]]]:
    """(where, script, arguments after the script) of every documented bench command."""
    found = [(f"{c.doc}:{c.line}", c.words) for path in user_docs() for c in commands(path)]
    for script in sorted(os.listdir(os.path.join(REPO, "bench"))):
        if script.endswith(".py"):
            found += _docstring_commands(f"bench/{script}")
    out = []
    for where, words in found:
        for i, word in enumerate(words):
            m = BENCH_SCRIPT.search(word)
            if m:
                out.append((where, m.group(1), words[i + 1:]))
                break
    return out


def test_documented_bench_commands_parse():
    documented = documented_bench_commands()
    docs = {(script, "--quick" in args) for where, script, args in documented
            if where.startswith("docs/")}
    # The reader sees the commands: each benchmark and its quick mode are documented.
    for script in QUICK_SCRIPTS:
        assert (script, False) in docs and (script, True) in docs, script
    assert ("bench/check_gpu.py", False) in docs
    bad = []
    for where, script, args in documented:
        if not os.path.exists(os.path.join(REPO, script)):
            bad.append(f"{where}: {script} does not exist")
            continue
        parser = bench_parser(script)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(args)
        except SystemExit:
            bad.append(f"{where}: {script} {' '.join(args)}: {stderr.getvalue().strip()}")
    assert not bad, "\n".join(bad)
