"""Faults a run must survive or refuse cleanly (issue #13).

`BAD_INPUT` is the table of bad input through the tools and the trainer: each case must give
exactly one `error:` line, a non-zero exit and no traceback, write nothing (neither the
output nor a temporary sibling) and leave every input byte-identical (a hash of the whole
project folder before and after). The other tests cover what a table cannot: overlapping
outputs and inputs, a run that diverges (it stops before the optimizer step with the last
good checkpoint intact), another run's --save folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.tool_runner import REPO, run_tool_here

BASE = ["--model", "tiny-smollm2", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "64", "--log-interval", "1"]
TRAIN = "launch/train.py"
_T = " ".join(BASE) + " --tokenizer smollm2 --data-path {data} --train-iters 2"

# name: (script, arguments with {placeholders}, a phrase of the error line). Placeholders:
# {ckpt} a dense checkpoint, {out} an output path that must stay absent, {file} a plain file,
# {ro} a read-only file system, {full} a 128 KiB one, {data} a dataset prefix, {hf_truncated}
# an HF folder with a truncated model.safetensors, {flipped} {ckpt} with one byte flipped
# in a shard, {text} a text file. Cases marked PROCESS start a real world (own process).
BAD_INPUT = {
    # Training flags: finiteness and range in one place (TrainConfig).
    "train-lr-inf": (TRAIN, _T + " --lr inf", "--lr inf: give a finite number"),
    "train-lr-nan": (TRAIN, _T + " --lr nan", "--lr nan: give a finite number"),
    "train-min-lr-nan": (TRAIN, _T + " --min-lr nan", "--min-lr nan: give a finite"),
    "train-clip-grad-nan": (TRAIN, _T + " --clip-grad nan", "--clip-grad nan: give a finite"),
    "train-weight-decay-inf": (TRAIN, _T + " --weight-decay inf", "--weight-decay inf: give"),
    "train-adam-eps-nan": (TRAIN, _T + " --adam-eps nan", "--adam-eps nan: give a finite"),
    "train-distill-temperature-nan": (TRAIN, _T + " --dynamoe-distill-temperature nan",
                                      "--dynamoe-distill-temperature nan: give a finite"),
    "train-distill-weight-nan": (TRAIN, _T + " --dynamoe-distill-weight nan",
                                 "--dynamoe-distill-weight nan: give a finite"),
    "train-router-lr-mult-inf": (TRAIN, _T + " --router-lr-mult inf",
                                 "--router-lr-mult inf: give a finite"),
    "train-sensitivity-max-nan": (TRAIN, _T + " --dynamoe-sensitivity-max nan",
                                  "--dynamoe-sensitivity-max nan: give a finite"),
    "train-timeout-inf": (TRAIN, _T + " --distributed-timeout-minutes inf",
                          "--distributed-timeout-minutes inf: give a finite"),
    "train-timeout-zero": (TRAIN, _T + " --distributed-timeout-minutes 0",
                           "--distributed-timeout-minutes 0.0 is out of range"),
    "train-warmup-equals-iters": (TRAIN, _T + " --lr-warmup-iters 2",
                                  "--lr-warmup-iters 2 must be below --train-iters 2"),
    "train-split-no-train": (TRAIN, _T + " --split 0,100,0",
                             "--split 0,100,0 gives training no documents"),
    "train-split-garbage": (TRAIN, _T + " --split a,b", "bad split 'a,b'"),
    "train-micro-batch-zero": (TRAIN, _T + " --micro-batch-size 0",
                               "--micro-batch-size 0 is out of range"),
    "train-adam-beta-one": (TRAIN, _T + " --adam-beta1 1", "--adam-beta1 1.0 is out of range"),
    "train-tp-zero": (TRAIN, _T + " --tensor-model-parallel-size 0",
                      "--tensor-model-parallel-size 0 is out of range"),
    "train-seed-negative": (TRAIN, _T + " --seed -1", "--seed -1 is out of range"),
    "train-negative-lr": (TRAIN, _T + " --lr=-1e-4", "--lr -0.0001 is out of range"),
    "train-static-sampled-dense": (TRAIN, _T + " --dynamoe-routing static-sampled --dense",
                                   "--dynamoe-routing static-sampled trains a DynaMoE model"),
    "train-static-target-zero": (TRAIN, _T + " --dynamoe-routing static-sampled "
                                 "--dynamoe-static-target-fraction 0",
                                 "--dynamoe-static-target-fraction 0.0 is out of range"),
    "train-trainable-params-unknown": (TRAIN, _T + " --trainable-params attention",
                                       "--trainable-params 'attention': choose one of all, ffn"),
    "train-unknown-flag": (TRAIN, _T + " --learning-rate 1e-4",
                           "unrecognized arguments: --learning-rate"),
    "train-lr-not-a-number": (TRAIN, _T + " --lr fast", "argument --lr: invalid float value"),
    # Tool flags: `cli.number` ranges, refused before any work.
    "moefy-unknown-flag": ("tools/moefy.py", "--load {ckpt} --output {out} --shells 4",
                           "unrecognized arguments: --shells"),
    "moefy-router-fit-lr-inf": ("tools/moefy.py", "--load {ckpt} --output {out} "
                                "--router-fit-lr inf", "give a finite number"),
    "moefy-label-tolerance-nan": ("tools/moefy.py", "--load {ckpt} --output {out} "
                                  "--dynamoe-label-tolerance nan", "give a finite number"),
    "moefy-level-fractions-nan": ("tools/moefy.py", "--load {ckpt} --output {out} "
                                  "--dynamoe-level-fractions 0.5,nan",
                                  "give a comma-separated list of finite numbers"),
    "moefy-batch-size-zero": ("tools/moefy.py", "--load {ckpt} --output {out} --batch-size 0",
                              "argument --batch-size: '0' is out of range"),
    "moefy-router-fit-more-than-windows": ("tools/moefy.py", "--load {ckpt} --output {out} "
                                           "--tokenizer smollm2 --calibration-sequences 2 "
                                           "--router-fit-sequences 3",
                                           "--router-fit-sequences 3 is more than the 2 "
                                           "calibration windows"),
    "moefy-output-error-at-tp2": ("tools/moefy.py", "--load {ckpt} --output {out} "
                                  "--tokenizer smollm2 --dynamoe-importance output-error "
                                  "--tensor-model-parallel-size 2",
                                  "MoEfy at --tensor-model-parallel-size 1"),
    "moefy-fit-steps-negative": ("tools/moefy.py", "--load {ckpt} --output {out} "
                                 "--router-fit-steps -1", "'-1' is out of range"),
    "export-ffn-budget-nan": ("tools/export.py", "--load {ckpt} --output {out} --ffn-budget nan",
                              "give a finite number"),
    "evaluate-sensitivity-inf": ("tools/evaluate.py", "--load {ckpt} --tokenizer smollm2 "
                                 "--output-dir {out} --sensitivities 1,inf",
                                 "give a finite number"),
    "upcycle-threshold-nan": ("tools/upcycle.py", "--load {ckpt} --output {out} --threshold nan",
                              "give a finite number"),
    "upcycle-top-p-zero": ("tools/upcycle.py", "--load {ckpt} --output {out} --top-p 0",
                           "argument --top-p: '0' is out of range: give a value in (0, 1]"),
    "plan-gpu-memory-inf": ("tools/plan_layout.py", "--model tiny-llama --num-gpus 8 "
                            "--gpu-memory-gib inf", "give a finite number"),
    "plan-tp-zero": ("tools/plan_layout.py", "--model tiny-llama --num-gpus 8 "
                     "--tensor-model-parallel-size 0", "'0' is out of range"),
    "plan-global-batch-zero": ("tools/plan_layout.py", "--model tiny-llama --num-gpus 8 "
                               "--global-batch-size 0", "'0' is out of range"),
    "plan-reserved-negative": ("tools/plan_layout.py", "--model tiny-llama --num-gpus 8 "
                               "--reserved-gib -1000", "'-1000' is out of range"),
    "plan-seq-length-zero": ("tools/plan_layout.py", "--model tiny-llama --num-gpus 8 "
                             "--seq-length 0", "'0' is out of range"),
    "plan-reserved-above-memory": ("tools/plan_layout.py", "--model tiny-llama --num-gpus 8 "
                                   "--gpu-memory-gib 80 --reserved-gib 90",
                                   "reserved memory 90.0 GiB must be in [0, GPU memory"),
    "convert-tolerance-nan": ("tools/convert_checkpoint.py", "hf-to-megatron --hf-model x "
                              "--output {out} --tolerance nan", "give a finite number"),
    "convert-parity-sequences-zero": ("tools/convert_checkpoint.py", "megatron-to-hf --load "
                                      "{ckpt} --output {out} --parity-sequences 0",
                                      "'0' is out of range"),
    "preprocess-limit-zero": ("tools/preprocess_data.py", "--input {text} --tokenizer smollm2 "
                              "--output-prefix {out} --limit 0", "'0' is out of range"),
    "profile-batch-size-zero": ("tools/profile_curriculum.py", "--load {ckpt} --output {out} "
                                "--data-path {data} --tokenizer smollm2 --batch-size 0",
                                "'0' is out of range"),
    # Inputs that are missing, truncated or corrupt.
    "moefy-missing-load": ("tools/moefy.py", "--load {ckpt}-absent --output {out} "
                           "--dynamoe-importance weight", "does not exist"),
    "moefy-truncated-shard": ("tools/moefy.py", "--load {truncated} --output {out} "
                              "--dynamoe-importance weight", "truncated"),
    "moefy-flipped-byte": ("tools/moefy.py", "--load {flipped} --output {out} "
                           "--dynamoe-importance weight",
                           "{flipped}/__0_0.distcp is corrupt (sha256 mismatch)"),
    "m2h-flipped-byte": ("tools/convert_checkpoint.py", "megatron-to-hf --load {flipped} "
                         "--output {out}", "{flipped}/__0_0.distcp is corrupt"),
    "evaluate-flipped-byte": ("tools/evaluate.py", "--load {flipped} --tokenizer smollm2 "
                              "--baselines dense --output-dir {out}",
                              "{flipped}/__0_0.distcp is corrupt"),
    "hf-truncated-safetensors": ("tools/convert_checkpoint.py", "hf-to-megatron --hf-model "
                                 "{hf_truncated} --output {out}",
                                 "model.safetensors is truncated"),
    # Outputs that cannot be written: refused before the work, not after it.
    "moefy-output-under-a-file": ("tools/moefy.py", "--load {ckpt} --output {file}/out "
                                  "--dynamoe-importance weight", "is a file, not a folder"),
    "moefy-output-read-only": ("tools/moefy.py", "--load {ckpt} --output {ro}/out "
                               "--dynamoe-importance weight", "Read-only file system"),
    "moefy-output-disk-full": ("tools/moefy.py", "--load {ckpt} --output {full}/out "
                               "--dynamoe-importance weight", "GiB free: free space there"),
    "m2h-output-read-only": ("tools/convert_checkpoint.py", "megatron-to-hf --load {ckpt} "
                             "--output {ro}/hf", "Read-only file system"),
    "preprocess-output-read-only": ("tools/preprocess_data.py", "--input {text} --tokenizer "
                                    "smollm2 --output-prefix {ro}/data",
                                    "Read-only file system"),
    "evaluate-output-read-only": ("tools/evaluate.py", "--load {ckpt} --tokenizer smollm2 "
                                  "--output-dir {ro}/eval", "Read-only file system"),
    "train-save-is-a-file": (TRAIN, _T + " --save {file}", "is a file, not a folder"),
    "train-save-read-only": (TRAIN, _T + " --save {ro}/run", "Read-only file system"),
    "train-save-disk-full": (TRAIN, _T + " --save {full}/run", "--save {full}/run has too "
                             "little free space"),
}
# Past argument parsing these start torch.distributed / Megatron groups of their own.
PROCESS = {"train-save-is-a-file", "train-save-read-only", "train-save-disk-full"}
NEEDS_MOUNTS = {name for name, (_, argv, _) in BAD_INPUT.items()
                if "{ro}" in argv or "{full}" in argv}


def test_the_table_holds_at_least_forty_kinds_of_bad_input():
    assert len(BAD_INPUT) >= 40


def _mount_tmpfs(path, options) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def fault_project(tmp_path_factory, single_rank, sotu_prefix):
    """The inputs every bad-input case may read (all under one folder, hashed before and
    after each case), plus a read-only and a 128 KiB file system when this machine lets the
    tests mount them (root); their cases are skipped otherwise."""
    import json
    import shutil

    from safetensors.torch import save_file

    from megatron_dynamoe.models.architectures import get_architecture, transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.models.builder import build_gpt_model

    root = tmp_path_factory.mktemp("faults")
    project = root / "project"
    arch = get_architecture("tiny-llama")
    ckpt = project / "dense"
    save_checkpoint(build_gpt_model(arch, transformer_config(arch)), str(ckpt),
                    CheckpointInfo(arch, None, {}))
    truncated = project / "truncated"
    shutil.copytree(ckpt, truncated)
    shard = truncated / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    flipped = project / "flipped"
    shutil.copytree(ckpt, flipped)
    with open(flipped / "__0_0.distcp", "r+b") as f:
        f.seek(os.path.getsize(flipped / "__0_0.distcp") // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))  # one exponent bit of a weight
    hf = project / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=128)))
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64)}, str(hf / "model.safetensors"))
    with open(hf / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(hf / "model.safetensors") - 1000)
    (project / "notes.txt").write_text("a plain file\n")
    (project / "speech.txt").write_text("Fellow citizens, the state of the union is strong.\n")
    mounts = {}
    if _mount_tmpfs(root / "ro", "ro,size=128k"):
        mounts["ro"] = root / "ro"
    if _mount_tmpfs(root / "full", "size=128k"):
        mounts["full"] = root / "full"
    yield dict(root=root, project=project, ckpt=ckpt, truncated=truncated, flipped=flipped,
               hf_truncated=hf,
               file=project / "notes.txt", text=project / "speech.txt", data=sotu_prefix,
               **mounts)
    for path in mounts.values():
        subprocess.run(["umount", str(path)], capture_output=True)


def _run_case(name, places):
    script, template, _ = BAD_INPUT[name]
    argv = template.format(**places).split()
    if name in PROCESS:
        return subprocess.run([sys.executable, os.path.join(REPO, script), *argv], env=_env(),
                              capture_output=True, text=True, timeout=600)
    return run_tool_here(script, *argv)


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_gives_one_error_line_and_writes_nothing(name, fault_project, tmp_path):
    if name in NEEDS_MOUNTS and not {"ro", "full"} <= set(fault_project):
        pytest.skip("mounting a read-only / 128 KiB tmpfs needs root")
    out = tmp_path / "result"
    places = {k: str(v) for k, v in fault_project.items()}
    places.update(out=str(out), full=str(fault_project.get("full", "")),
                  ro=str(fault_project.get("ro", "")))
    watched = [fault_project["project"]] + [fault_project[k] for k in ("ro", "full")
                                            if k in fault_project]
    before = [_tree_hash(p) for p in watched]
    done = _run_case(name, places)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0, done.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    phrase = BAD_INPUT[name][2].format(**places)
    assert phrase in errors[0], (phrase, errors[0])
    assert not os.listdir(tmp_path), "something was written next to the output"
    assert [_tree_hash(p) for p in watched] == before, "an input changed"


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
    from megatron_dynamoe.checkpoint.loading import load_for_evaluation

    model = load_for_evaluation(str(save)).model  # the --save folder's latest checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
    from megatron_dynamoe.models.architectures import get_architecture, transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.models.builder import build_gpt_model

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


def test_the_data_index_cache_is_private(tmp_path, monkeypatch):
    # Megatron loads the cached index .npy files with pickle enabled: a cache folder another
    # user owns or may write is refused, and the default is never a shared temporary folder.
    from megatron_dynamoe.data.datasets import _check_cache_owner, default_cache_path
    from megatron_dynamoe.data.errors import DataError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == str(tmp_path / "xdg" / "megatron-dynamoe" / "data")
    assert default_cache_path("runs/a") == os.path.join("runs/a", "data_cache")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    _check_cache_owner(str(mine))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DataError, match="is writable by other users"):
        _check_cache_owner(str(shared))
    if os.getuid() == 0:  # only root can hand a folder to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(DataError, match=r"belongs to another user \(uid 65534\)"):
            _check_cache_owner(str(foreign))
