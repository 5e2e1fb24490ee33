"""Nothing silently wrong when loading a checkpoint (issue #13 items 2 and 7):

- every saved checkpoint carries checksums.json listing every other file with its size and
  SHA-256 (recomputed here with hashlib), from one rank and from two (the hashing split);
- one flipped byte, a truncated / missing / extra file, a corrupt manifest, no manifest:
  refused with one line naming the file (the same line on both ranks), or loaded (with a
  note), and `verify_checksums=False` really loads the flipped weights;
- planted pickles in `.metadata` and in a byte item are refused and run nothing (the marker
  file stays absent; the unchecked torch path would have created it);
- bench/bench_checksums.py --quick runs and prints its numbers.
"""

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_dynamoe.checkpoint.integrity import (MANIFEST_FILE, read_dcp_metadata,
                                                   verify_checkpoint)
from megatron_dynamoe.checkpoint.torch_dist import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    read_info,
    save_checkpoint,
    verify_checkpoint_files,
)
from tests.builders import ARCH, build_dense
from tests.multiproc import run_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = CheckpointInfo(ARCH, None, {})


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _independent_manifest(folder: str) -> dict:
    """name -> {size, hash} of every file but the manifest, computed here."""
    return {name: dict(size=os.path.getsize(os.path.join(folder, name)),
                       hash=_sha256(os.path.join(folder, name)))
            for name in sorted(os.listdir(folder)) if name != MANIFEST_FILE}


def _flip_byte_in_largest_tensor(folder: str) -> tuple:
    """XOR one bit in the middle of the largest tensor's bytes; returns (file, tensor key)."""
    metadata = read_dcp_metadata(folder)
    index, info = max(metadata.storage_data.items(), key=lambda kv: kv[1].length)
    path = os.path.join(folder, info.relative_path)
    with open(path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 1]))
    return info.relative_path, index.fqn


def _rewrite_manifest(folder: str) -> None:
    """What a tamperer would do after editing a file: make checksums.json agree again."""
    path = os.path.join(folder, MANIFEST_FILE)
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"] = _independent_manifest(folder)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


class _Touch:
    """A pickle payload that, when unpickled, creates `marker` through os.system."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------- single rank

@pytest.fixture(scope="module")
def saved(tmp_path_factory, single_rank):
    """(folder, model) of a saved dense tiny LLaMA; tests work on copies of the folder."""
    model = build_dense(seed=0)
    folder = str(tmp_path_factory.mktemp("integrity") / "dense")
    save_checkpoint(model, folder, INFO)
    return folder, model


@pytest.fixture
def copy(saved, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], folder)
    return folder


def test_manifest_lists_every_file_with_its_sha256(saved):
    folder, model = saved
    with open(os.path.join(folder, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    assert manifest["format_version"] == 1 and manifest["algorithm"] == "sha256"
    assert manifest["files"] == _independent_manifest(folder)
    assert {".metadata", "common.pt", "model.json", "metadata.json"} <= set(manifest["files"])
    assert sum(name.endswith(".distcp") for name in manifest["files"]) >= 1
    loaded = build_dense(seed=1)
    assert not _weights_equal(loaded, model)
    load_checkpoint(loaded, folder)
    assert _weights_equal(loaded, model)


def test_older_metadata_name_is_still_read(saved, copy):
    """Checkpoints written before the family registry call their metadata `dynamoe.json`:
    such a folder (its manifest naming that file) still loads, with its family and config."""
    _, model = saved
    os.rename(os.path.join(copy, "model.json"), os.path.join(copy, "dynamoe.json"))
    path = os.path.join(copy, MANIFEST_FILE)
    with open(path) as f:
        manifest = json.load(f)
    manifest["files"]["dynamoe.json"] = manifest["files"].pop("model.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    info = read_info(copy)
    assert info.architecture == ARCH and info.dynamoe is None
    assert info.extra["model_family"] == "dense"
    loaded = build_dense(seed=1)
    load_checkpoint(loaded, copy)
    assert _weights_equal(loaded, model)


def test_flipped_byte_is_refused_and_really_changes_weights(saved, copy):
    _, model = saved
    shard, key = _flip_byte_in_largest_tensor(copy)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(build_dense(seed=1), copy)
    message = str(error.value)
    assert message == (f"checkpoint file {os.path.join(copy, shard)} is corrupt (sha256 "
                       f"mismatch): copy it again from a good copy, or pass "
                       f"--no-verify-checksums to load it anyway")
    # Without the hashing the load goes through and exactly the flipped tensor differs: the
    # checksum is what caught it (dist_checkpointing itself does not notice).
    loaded = build_dense(seed=1)
    load_checkpoint(loaded, copy, verify_checksums=False)
    original, flipped = model.state_dict(), loaded.state_dict()
    differ = [k for k, v in original.items()
              if isinstance(v, torch.Tensor) and not torch.equal(v, flipped[k])]
    assert differ == [key]
    assert (original[key] != flipped[key]).sum().item() == 1


def test_truncated_and_missing_files(copy):
    # A file only the manifest knows (model.json) missing: refused; unhashed, it loads.
    os.remove(os.path.join(copy, "model.json"))
    with pytest.raises(CheckpointError, match="is incomplete: model.json is missing"):
        verify_checkpoint_files(copy)
    verify_checkpoint_files(copy, verify_checksums=False)
    shard = os.path.join(copy, "__0_1.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint file {shard} is truncated ({size - 10} bytes, {MANIFEST_FILE} "
            f"lists {size}): copy it again from a good copy, or pass --no-verify-checksums")):
        verify_checkpoint_files(copy)  # the first problem in file order, before model.json
    # Without the hashing, the .metadata size check still refuses the truncation.
    with pytest.raises(CheckpointError, match=re.escape(f"{shard!r} is truncated")):
        verify_checkpoint_files(copy, verify_checksums=False)
    os.remove(shard)
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="is incomplete: __0_1.distcp is missing"):
            verify_checkpoint_files(copy, verify_checksums=verify)


def test_a_file_not_in_the_manifest_is_ignored(saved, copy):
    with open(os.path.join(copy, "NOTES.txt"), "w") as f:
        f.write("copied from the cluster on Monday\n")
    loaded = build_dense(seed=1)
    load_checkpoint(loaded, copy)
    assert _weights_equal(loaded, saved[1])


def test_corrupt_manifest_is_named(saved, copy):
    manifest = os.path.join(copy, MANIFEST_FILE)
    with open(manifest, "w") as f:
        f.write('{"format_version": 1, "algorithm": "sha256", "files": {"__0_0.dis')
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(build_dense(seed=1), copy)
    assert str(error.value).startswith(f"{manifest} is unreadable or corrupt (JSONDecodeError")
    assert "--no-verify-checksums" in str(error.value) and "\n" not in str(error.value)
    with open(manifest, "w") as f:
        json.dump(dict(format_version=1, algorithm="sha256",
                       files={"../../etc/passwd": dict(size=1, hash="00")}), f)
    with pytest.raises(CheckpointError, match="points outside the checkpoint"):
        verify_checkpoint_files(copy)
    loaded = build_dense(seed=1)
    load_checkpoint(loaded, copy, verify_checksums=False)
    assert _weights_equal(loaded, saved[1])


def test_checkpoint_without_manifest_loads_with_a_note(saved, copy, capsys):
    os.remove(os.path.join(copy, MANIFEST_FILE))
    loaded = build_dense(seed=1)
    load_checkpoint(loaded, copy)
    assert _weights_equal(loaded, saved[1])
    out = capsys.readouterr().out
    assert out.count(f"note: {copy} has no {MANIFEST_FILE}") == 1, out
    load_checkpoint(loaded, copy)  # the note is printed once per folder
    assert "note:" not in capsys.readouterr().out
    verify_checkpoint_files(copy, verify_checksums=False)


def test_planted_pickle_in_metadata_runs_nothing(copy, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    marker = str(tmp_path / "pwned-metadata")
    path = os.path.join(copy, ".metadata")
    real = read_dcp_metadata(copy)
    with open(path, "wb") as f:
        pickle.dump([_Touch(marker), real], f)
    # Caught by the checksum first; with a matching manifest (rewritten by the tamperer) or
    # none, by the unpickler itself.
    with pytest.raises(CheckpointError,
                       match=rf"\.metadata is longer than saved \(\d+ bytes, {MANIFEST_FILE}"):
        load_checkpoint(build_dense(seed=1), copy)
    _rewrite_manifest(copy)
    for verify in (True, False):
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(build_dense(seed=1), copy, verify_checksums=verify)
        assert str(error.value) == (
            f"{path} refers to posix.system, which a checkpoint never holds: refusing to "
            f"unpickle it (the file is corrupt or was tampered with)")
    assert not os.path.exists(marker)
    with pytest.raises(AttributeError):  # torch's reader: pickle.load, then a list breaks it
        FileSystemReader(copy).read_metadata()
    assert os.path.exists(marker)  # ... after the planted command ran


def test_planted_pickle_in_byte_item_runs_nothing(tmp_path):
    """A ShardedObject (like the RNG or optimizer state) whose pickle runs a command: the
    checkpoint is internally consistent (checksums written after it), still refused."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    marker = str(tmp_path / "pwned-item")

    class Planted(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def sharded_state_dict(self):
            return {**self.model.sharded_state_dict(),
                    "rng_state": ShardedObject("rng_state", _Touch(marker), (1,), (0,),
                                               replica_id=0)}

    folder = str(tmp_path / "planted")
    save_checkpoint(Planted(build_dense(seed=0)), folder, INFO)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(build_dense(seed=1), folder, verify_checksums=False)
    message = str(error.value)
    assert re.fullmatch(rf"checkpoint file {re.escape(folder)}/__0_\d\.distcp item "
                        rf"'rng_state/shard_0_1' holds posix\.system, which a checkpoint never "
                        rf"holds: refusing to unpickle it \(the file is corrupt or was "
                        rf"tampered with\)", message), message
    assert not os.path.exists(marker)
    template = {"rng_state": ShardedObject("rng_state", None, (1,), (0,), replica_id=0)}
    dist_checkpointing.load(template, folder)  # what Megatron would have done unchecked
    assert os.path.exists(marker)


def test_planted_common_pt_is_refused(copy, tmp_path):
    marker = str(tmp_path / "pwned-common")
    torch.save({"training": _Touch(marker)}, os.path.join(copy, "common.pt"))
    _rewrite_manifest(copy)
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint file {os.path.join(copy, 'common.pt')} holds posix.system")):
        verify_checkpoint_files(copy)
    assert not os.path.exists(marker)


def test_byte_item_with_unknown_transform_is_refused(copy):
    """DCP may store items through stream transforms (zstd); one this check cannot undo is
    refused rather than handed unchecked to torch.load(weights_only=False)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(copy)
    index, info = next((i, s) for i, s in sorted(metadata.storage_data.items(),
                                                  key=lambda kv: kv[0].fqn)
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    info.transform_descriptors = ["mystery/1"]
    with open(os.path.join(copy, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint_files(copy, verify_checksums=False)
    assert str(error.value) == (
        f"checkpoint file {os.path.join(copy, info.relative_path)} item {index.fqn!r} is stored "
        f"with the transform ['mystery/1'], which this check cannot decode (ValueError): "
        f"refusing to load it unchecked; save the checkpoint without DCP stream transforms")


def test_real_metadata_holds_only_allowed_classes(saved):
    """The restricted unpickler reads what torch's own reader reads."""
    from torch.distributed.checkpoint import FileSystemReader

    ours, theirs = read_dcp_metadata(saved[0]), FileSystemReader(saved[0]).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data
    assert verify_checkpoint(saved[0], collective=False).storage_data == theirs.storage_data


# --------------------------------------------------------------------------- two ranks

def _two_rank_worker(rank, world_size, folder, out):
    import torch.distributed as dist

    from megatron_dynamoe.checkpoint import integrity as checkpoint_integrity
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    layout = ParallelLayout(tensor_model_parallel_size=2)
    initialize_parallel(layout)
    hashed = []
    real_digest = checkpoint_integrity.file_digest

    def recording_digest(path, *args):
        hashed.append(os.path.basename(path))
        return real_digest(path, *args)

    checkpoint_integrity.file_digest = recording_digest
    save_checkpoint(build_dense(seed=0, layout=layout), folder, INFO)
    saved_by_me = list(hashed)
    independent = _independent_manifest(folder) if rank == 0 else None
    if rank == 0:
        _flip_byte_in_largest_tensor(folder)
    dist.barrier()
    hashed.clear()
    try:
        verify_checkpoint_files(folder)
        message = None
    except CheckpointError as e:
        message = str(e)
    torch.save(dict(saved=saved_by_me, verified=list(hashed), message=message,
                    independent=independent),
               os.path.join(out, f"rank{rank}.pt"))


def test_two_ranks_split_the_hashing_and_agree(tmp_path):
    folder, out = str(tmp_path / "tp2"), str(tmp_path)
    run_processes(_two_rank_worker, 2, folder, out, timeout=300)
    results = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    with open(os.path.join(folder, MANIFEST_FILE)) as f:
        files = json.load(f)["files"]
    # Every file hashed exactly once, by one of the two ranks, and both ranks took a share.
    shares = [sorted(r["saved"]) for r in results]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(files)
    assert sum(name.endswith(".distcp") for name in files) == 4  # 2 ranks x 2 writer threads
    # The manifest is what one process hashing every file finds (before the corruption).
    assert files == results[0]["independent"]
    changed = [name for name, entry in _independent_manifest(folder).items()
               if entry != files[name]]
    assert len(changed) == 1 and changed[0].endswith(".distcp")
    messages = [r["message"] for r in results]
    assert messages[0] == messages[1] == (
        f"checkpoint file {os.path.join(folder, changed[0])} is corrupt (sha256 mismatch): "
        f"copy it again from a good copy, or pass --no-verify-checksums to load it anyway")
    assert all(r["verified"] for r in results)  # verification split over both ranks too


# --------------------------------------------------------------------------- benchmark

def test_benchmark_quick_mode():
    done = subprocess.run([sys.executable, os.path.join("bench", "bench_checksums.py"),
                           "--quick"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = dict(re.findall(r"^(\w+): ([0-9.]+)$", done.stdout, flags=re.M))
    for name in ("checkpoint_gb", "save_s", "save_without_manifest_s", "manifest_hash_s",
                 "manifest_hash_gb_per_s", "verify_s", "verify_without_hashing_s",
                 "verify_hash_gb_per_s", "load_s", "load_without_verify_checksums_s",
                 "sha256_memory_gb_per_s"):
        assert float(numbers[name]) >= 0, (name, done.stdout)
    assert 0.015 < float(numbers["checkpoint_gb"]) < 0.02
    assert float(numbers["manifest_hash_gb_per_s"]) > 0 and float(numbers["save_s"]) > 0
