"""Faults a run must survive or refuse cleanly (issue #13; table-driven, grows with it).

Each bad setting gives one `error:` line and a non-zero exit; a run that diverges stops
before the optimizer step with the last good checkpoint intact."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.tool_runner import REPO, tool_main

BASE = ["--model", "tiny-smollm2", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "64", "--log-interval", "1"]

NON_FINITE_FLAGS = [
    ("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "nan"), ("--clip-grad", "nan"),
    ("--weight-decay", "inf"), ("--adam-eps", "nan"), ("--dynamoe-distill-temperature", "nan"),
    ("--dynamoe-distill-weight", "nan"), ("--router-lr-mult", "inf"),
    ("--dynamoe-sensitivity-max", "nan"), ("--distributed-timeout-minutes", "inf"),
]


@pytest.mark.parametrize("flag,value", NON_FINITE_FLAGS)
def test_non_finite_numeric_flags_are_refused_in_one_line(flag, value):
    from megatron_dynamoe.training.config import parse_train_args

    with pytest.raises(ValueError, match=f"{flag} {value}: give a finite number"):
        parse_train_args(BASE + [flag, value])


def _env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.usefixtures("single_rank")
def test_divergence_stops_before_the_step_and_keeps_the_last_good_checkpoint(sotu_prefix,
                                                                             tmp_path):
    # A finite but absurd learning rate: iteration 1 is fine, its update makes the next
    # gradients NaN. The run must stop at iteration 2 with exit 4 and one error line, with
    # iteration 1's checkpoint (finite weights) as the latest.
    save = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), *BASE, "--tokenizer",
         "smollm2", "--data-path", sotu_prefix, "--save", str(save), "--save-interval", "1",
         "--train-iters", "8", "--lr", "1e30", "--data-cache-path", str(tmp_path / "cache")],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 4, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite gradients at iteration 2" in errors[0], errors
    assert "found NaN in local grad norm" in errors[0] and "Traceback" not in done.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == \
        ["iter_0000001"]
    from megatron_dynamoe.evaluation.loading import load_for_evaluation

    model = load_for_evaluation(str(save)).model  # the --save folder's latest checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())


TOOL_FLAGS = [
    ("tools/moefy.py", ["--load", "x", "--output", "y", "--router-fit-lr", "inf"]),
    ("tools/moefy.py", ["--load", "x", "--output", "y", "--dynamoe-label-tolerance", "nan"]),
    ("tools/moefy.py", ["--load", "x", "--output", "y", "--dynamoe-level-fractions",
                        "0.5,nan"]),
    ("tools/export.py", ["--load", "x", "--output", "y", "--ffn-budget", "nan"]),
    ("tools/evaluate.py", ["--load", "x", "--tokenizer", "smollm2", "--output-dir", "y",
                           "--sensitivities", "1,inf"]),
    ("tools/upcycle.py", ["--load", "x", "--output", "y", "--threshold", "nan"]),
    ("tools/plan_layout.py", ["--gpu-memory-gib", "inf"]),
    ("tools/convert_checkpoint.py", ["hf-to-megatron", "--hf-model", "x", "--output", "y",
                                     "--tolerance", "nan"]),
]


@pytest.mark.parametrize("script,argv", TOOL_FLAGS,
                         ids=[f"{s.split('/')[-1]}:{a[-2]}" for s, a in TOOL_FLAGS])
def test_tools_refuse_non_finite_numbers(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool_main(script)(argv)
    assert exit_info.value.code == 2
    assert "give a finite number" in capsys.readouterr().err


def _tree_hash(root, ignore=(".dynamoe-run.lock",)):
    """Names and bytes of every file under `root` (the run lock, which only records who holds
    the folder, excepted)."""
    import hashlib

    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(set(files) - set(ignore)):
            path = os.path.join(folder, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, single_rank):
    from megatron_dynamoe.architectures import get_architecture, transformer_config
    from megatron_dynamoe.checkpointing import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.model_builder import build_gpt_model

    arch = get_architecture("tiny-llama")
    folder = tmp_path_factory.mktemp("project") / "ckpt" / "dense"
    save_checkpoint(build_gpt_model(arch, transformer_config(arch)), str(folder),
                    CheckpointInfo(arch, None, {}))
    (folder.parent.parent / "notes.txt").write_text("unrelated work\n")
    return folder


# The output equals, contains or lies inside the input: refused even with --overwrite.
OVERLAPS = {
    "moefy-same": ("tools/moefy.py", "--load {ckpt} --output {ckpt} --overwrite", "is"),
    "moefy-parent": ("tools/moefy.py", "--load {ckpt} --output {project} --overwrite",
                     "contains"),
    "export-inside": ("tools/export.py", "--load {ckpt} --output {ckpt}/variant --overwrite",
                      "lies inside"),
    "upcycle-parent": ("tools/upcycle.py", "--load {ckpt} --output {ckpt_parent} --overwrite",
                       "contains"),
    "evaluate-same": ("tools/evaluate.py", "--load {ckpt} --tokenizer smollm2 --output-dir "
                                           "{ckpt} --overwrite", "is"),
    "m2h-same": ("tools/convert_checkpoint.py", "megatron-to-hf --load {ckpt} --output {ckpt} "
                                                "--overwrite", "is"),
    "profile-inside": ("tools/profile_curriculum.py", "--load {ckpt} --output "
                                                      "{ckpt}/scores.json --data-path x "
                                                      "--tokenizer smollm2 --overwrite",
                       "lies inside"),
}


@pytest.mark.parametrize("name", sorted(OVERLAPS))
def test_an_output_over_an_input_is_refused_and_the_input_untouched(name, dense_checkpoint):
    from tests.tool_runner import run_tool_here

    script, flags, relation = OVERLAPS[name]
    project = dense_checkpoint.parent.parent
    before = _tree_hash(project)
    argv = flags.format(ckpt=dense_checkpoint, project=project,
                        ckpt_parent=dense_checkpoint.parent).split()
    done = run_tool_here(script, *argv)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: output ") and f" {relation} the input " in lines[-1], \
        lines
    assert _tree_hash(project) == before


def test_preprocess_refuses_to_write_over_its_input(tmp_path):
    from tests.tool_runner import run_tool_here

    # An existing dataset given as the input, its own prefix as the output.
    source = tmp_path / "corpus.bin"
    source.write_text("some text\n" * 10)
    before = source.read_bytes()
    done = run_tool_here("tools/preprocess_data.py", "--input", str(source), "--tokenizer",
                         "smollm2", "--output-prefix", str(tmp_path / "corpus"), "--overwrite")
    assert done.returncode == 2 and "error: output" in done.stderr, done.stderr
    assert source.read_bytes() == before


def _fake_run(save, iteration=4):
    """A --save folder as a finished run leaves it (the files `latest_checkpoint` reads)."""
    folder = save / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    (save / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def test_a_save_folder_with_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    from megatron_dynamoe.training.run_dir import claim_save_dir

    save = tmp_path / "run"
    _fake_run(save)
    before = _tree_hash(save)
    lock, error = claim_save_dir(str(save), None, overwrite=False)
    assert "holds another run's checkpoints (latest iteration 4)" in error
    lock.close()
    assert _tree_hash(save) == before
    lock, error = claim_save_dir(str(save), str(save), overwrite=False)  # a resume
    assert error is None
    lock.close()
    lock, error = claim_save_dir(str(save), None, overwrite=True)  # start over
    assert error is None and not [p for p in os.listdir(save) if not p.startswith(".")]
    lock.close()


def test_two_runs_cannot_share_a_save_folder(tmp_path):
    from megatron_dynamoe.training.run_dir import claim_save_dir

    first, error = claim_save_dir(str(tmp_path / "run"), None, overwrite=False)
    assert error is None
    second, error = claim_save_dir(str(tmp_path / "run"), None, overwrite=False)
    assert second is None and "is in use by another run (host " in error
    first.close()  # the first run ends: the folder is free again (also after a kill -9)
    again, error = claim_save_dir(str(tmp_path / "run"), None, overwrite=False)
    assert error is None
    again.close()


def test_trainer_refuses_another_runs_save_folder_and_leaves_it_intact(sotu_prefix,
                                                                      tmp_path):
    save = tmp_path / "run"
    _fake_run(save)
    before = _tree_hash(save)
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), *BASE, "--tokenizer",
         "smollm2", "--data-path", sotu_prefix, "--save", str(save), "--train-iters", "2",
         "--data-cache-path", str(tmp_path / "cache")],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: --save {save} holds another run's checkpoints"), done.stderr[-2000:]
    assert _tree_hash(save) == before
