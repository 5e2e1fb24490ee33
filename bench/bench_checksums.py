"""What the checkpoint checksums cost (issue #13 item 2): a torch_dist checkpoint of --gb GB
of fp32 tensors is saved with and without `checksums.json`, verified with and without the
hashing, and loaded with `load_checkpoint` with and without it.

Prints one `name: value` line per number (seconds, GB/s over the checkpoint's bytes; the
saves and loads are the best of two alternating rounds), plus the in-memory speed of the
candidate hashes. The files were just written, so reads come from
the page cache: this is the CPU cost; on cold storage reading dominates hashing and loading
alike.

    python bench/bench_checksums.py              # 1 GB, ~1 min on 2 cores
    python bench/bench_checksums.py --quick      # 16 MB, a few seconds (tests run it)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

import torch


TENSORS = 8
ROUNDS = 2


class _Blob(torch.nn.Module):
    """`TENSORS` fp32 parameters totalling `nbytes`, sharded as whole tensors (one rank)."""

    def __init__(self, nbytes: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        rows = max(nbytes // (4 * 1024 * TENSORS), 1)
        for i in range(TENSORS):
            self.register_parameter(f"w{i}", torch.nn.Parameter(
                torch.rand(rows, 1024, generator=gen), requires_grad=False))

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        return {name: ShardedTensor.from_rank_offsets(name, p.data, replica_id=0)
                for name, p in self.named_parameters()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _hash_speed(algorithm: str, nbytes: int) -> float:
    """GB/s of hashlib `algorithm` over `nbytes` in memory, in 8 MiB updates."""
    data = memoryview(os.urandom(nbytes))
    h = hashlib.new(algorithm)
    step = 8 << 20
    seconds = _timed(lambda: [h.update(data[i:i + step]) for i in range(0, nbytes, step)])
    return nbytes / seconds / 1e9


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


def run(nbytes: int, work: str) -> dict:
    """Every measurement, as name -> number."""
    from megatron_dynamoe.checkpoint import integrity as checkpoint_integrity
    from megatron_dynamoe.models.architectures import get_architecture
    from megatron_dynamoe.checkpoint.torch_dist import (CheckpointInfo, load_checkpoint,
                                                save_checkpoint, verify_checkpoint_files)

    info = CheckpointInfo(get_architecture("tiny-llama"), None, {})
    model = _Blob(nbytes, seed=0)
    checked = os.path.join(work, "checked")
    # Warm-up (helper process, imports).
    save_checkpoint(model, os.path.join(work, "warmup"), info)
    shutil.rmtree(os.path.join(work, "warmup"))
    real_write = checkpoint_integrity.write_manifest
    in_save = []

    def timed_write(*args, **kwargs):
        in_save.append(_timed(lambda: real_write(*args, **kwargs)))

    def save(with_manifest: bool) -> float:
        # Alternating rounds, best of each: the host's write-back of the previous round's
        # gigabyte would otherwise be charged to whichever save comes second.
        checkpoint_integrity.write_manifest = timed_write if with_manifest else (
            lambda *a, **k: None)
        shutil.rmtree(checked, ignore_errors=True)
        try:
            return _timed(lambda: save_checkpoint(model, checked, info))
        finally:
            checkpoint_integrity.write_manifest = real_write

    rounds = [(save(False), save(True)) for _ in range(ROUNDS)]
    save_without, save_with = min(r[0] for r in rounds), min(r[1] for r in rounds)
    size = _folder_bytes(checked)
    hash_save = _timed(lambda: checkpoint_integrity.write_manifest(checked))
    verify_with = _timed(lambda: verify_checkpoint_files(checked))
    verify_without = _timed(lambda: verify_checkpoint_files(checked, verify_checksums=False))
    target = _Blob(nbytes, seed=1)
    loads = [(_timed(lambda: load_checkpoint(target, checked, verify_checksums=False)),
              _timed(lambda: load_checkpoint(target, checked))) for _ in range(ROUNDS)]
    load_without, load_with = min(r[0] for r in loads), min(r[1] for r in loads)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), target.parameters()))
    gb = size / 1e9
    return dict(
        checkpoint_gb=gb, files=len(os.listdir(checked)),
        save_s=save_with, save_without_manifest_s=save_without,
        manifest_in_save_s=min(in_save), manifest_hash_s=hash_save,
        manifest_hash_gb_per_s=gb / hash_save,
        verify_s=verify_with, verify_without_hashing_s=verify_without,
        verify_hash_gb_per_s=gb / max(verify_with - verify_without, 1e-9),
        load_s=load_with, load_without_verify_checksums_s=load_without,
        sha256_memory_gb_per_s=_hash_speed("sha256", min(nbytes, 256 << 20)),
        blake2b_memory_gb_per_s=_hash_speed("blake2b", min(nbytes, 256 << 20)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (1e9 bytes)")
    p.add_argument("--quick", action="store_true", help="16 MB instead of --gb")
    p.add_argument("--work-dir", default=None, help="where to write (default: a temp folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout())
    nbytes = 16 << 20 if args.quick else int(args.gb * 1e9)
    work = tempfile.mkdtemp(prefix="bench-checksums-", dir=args.work_dir)
    try:
        results = run(nbytes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, value in results.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
