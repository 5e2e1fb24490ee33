"""Nothing silently wrong when loading a checkpoint: checksums and safe unpickling.

Checksums. `checkpointing.save_checkpoint` writes `checksums.json` into every checkpoint it
writes (tool outputs and training `iter_N` folders alike), after all other files and before
the folder is renamed into place:

    {"format_version": 1, "algorithm": "sha256",
     "files": {"__0_0.distcp": {"size": 232997, "hash": "<hex digest>"}, ...}}

It lists every file of the folder (relative paths) but itself. The hashing is split over the
ranks (longest file first onto the least-loaded rank; every rank computes the same plan) and
the digests travel to rank 0 as Python objects (`all_gather_object`), so the cost per rank
shrinks with the world size and no host tensor enters a collective. Files are streamed in
8 MiB chunks. SHA-256: on this project's CPU (AMD EPYC with SHA extensions, hashlib, 8 MiB
chunks) it hashes 1.25 GB/s against 0.52 GB/s for BLAKE2b (sha1 1.03, sha512 0.62), and x86
SHA-NI / ARMv8 crypto extensions make it the fast strong hash on current cluster CPUs too.
`bench/bench_checksums.py` measures the cost on a 1 GB checkpoint.

Safe loading. torch.distributed.checkpoint reads `.metadata` with plain `pickle.load` and its
load planner reads byte items (Megatron ShardedObjects: RNG and optimizer state) with
`torch.load(weights_only=False)`: a planted pickle would run code. Before any of that,
`verify_checkpoint` reads `.metadata` with an unpickler that resolves only the classes DCP
metadata holds (found by saving model and training checkpoints), and loads every byte item
and `common.pt` with `weights_only=True`; anything else is refused with one line.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import heapq
import io
import json
import os
import pickle
import re
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_dynamoe.checkpoint.torch_dist import CheckpointError, check_loadable

MANIFEST_FILE = "checksums.json"
MANIFEST_VERSION = 1
HASH_ALGORITHM = "sha256"
CHUNK_BYTES = 8 << 20
DCP_METADATA_FILE = ".metadata"
COMMON_STATE_FILE = "common.pt"
_SKIP_HINT = "copy it again from a good copy, or pass --no-verify-checksums to load it anyway"
_noted = set()  # folders whose "cannot be verified" note this process printed


# ---------------------------------------------------------------------------- ranks

def _world(collective: bool) -> Tuple[int, int]:
    if collective and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj, collective: bool) -> list:
    """Every rank's `obj` (Python objects: no tensor of ours enters the collective)."""
    _, world = _world(collective)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def run_on_rank0(fn: Callable, collective: bool = True):
    """Run `fn()` on rank 0 only and give its result to every rank (a collective). When it
    fails, every rank raises (CheckpointError with the same line; rank 0 re-raises anything
    but a CheckpointError / OSError as it was), so no rank is left waiting in a later
    collective."""
    rank, world = _world(collective)
    outcome, failure = None, None
    if rank == 0:
        try:
            outcome = ("ok", fn())
        except CheckpointError as e:
            outcome = ("error", str(e))
        except Exception as e:  # noqa: BLE001 -- the other ranks must hear of it
            outcome, failure = ("error", f"{type(e).__name__}: {e}"), e
    if world > 1:
        holder = [outcome]
        dist.broadcast_object_list(holder, src=0)
        outcome = holder[0]
    if outcome[0] == "error":
        if failure is not None and not isinstance(failure, OSError):
            raise failure
        raise CheckpointError(outcome[1])
    return outcome[1]


def assign_tasks(costs: List[int], world: int) -> List[int]:
    """Owner rank of each task: the most expensive first, each onto the least-loaded rank
    (LPT scheduling). Deterministic, so every rank computes the same plan locally."""
    loads = [(0, r) for r in range(world)]
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + max(int(costs[i]), 1), r))
    return owner


# ---------------------------------------------------------------------------- checksums

def file_digest(path: str, algorithm: str = HASH_ALGORITHM) -> Tuple[int, str]:
    """(bytes read, hex digest) of one file, streamed in CHUNK_BYTES chunks through one
    reused buffer (a shard is never held in memory)."""
    h = hashlib.new(algorithm)
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def list_files(directory: str) -> List[Tuple[str, int]]:
    """(relative path, size) of every file under `directory` but the manifest, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST_FILE:
                found.append((rel, os.path.getsize(path)))
    return sorted(found)


def write_manifest(directory: str, collective: bool = True) -> dict:
    """Hash every file of `directory` and write its `checksums.json` (every rank calls once
    all files are written; `collective=False`: this process alone hashes everything).
    Rank 0 lists the files, each rank hashes its share, rank 0 writes the manifest. Returns
    the manifest on every rank."""
    rank, world = _world(collective)
    listing = run_on_rank0(lambda: list_files(directory), collective)
    owner = assign_tasks([size for _, size in listing], world)
    mine, error = {}, None
    for i, (name, _) in enumerate(listing):
        if owner[i] == rank:
            try:
                size, digest = file_digest(os.path.join(directory, name))
            except OSError as e:
                error = f"cannot hash {os.path.join(directory, name)} for {MANIFEST_FILE}: {e}"
                break
            mine[name] = dict(size=size, hash=digest)
    files = {}
    for part, failure in _all_gather((mine, error), collective):
        if failure:
            raise CheckpointError(failure)
        files.update(part)
    manifest = dict(format_version=MANIFEST_VERSION, algorithm=HASH_ALGORITHM,
                    files=dict(sorted(files.items())))

    def write():
        with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=1)

    run_on_rank0(write, collective)
    return manifest


def read_manifest(directory: str) -> Optional[dict]:
    """The folder's `checksums.json` (validated), or None when it has none. Raises
    CheckpointError naming the manifest when it is unreadable or malformed."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    fix = ("copy it again from a good copy of the checkpoint, or pass --no-verify-checksums "
           "to load the checkpoint without checking it")
    try:
        with open(path) as f:
            manifest = json.load(f)
        problem = _manifest_problem(manifest)
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {str(e)[:200]}"
    if problem:
        raise CheckpointError(f"{path} is unreadable or corrupt ({problem}): {fix}")
    return manifest


def _manifest_problem(manifest) -> Optional[str]:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return "no 'files' table"
    if manifest.get("format_version") != MANIFEST_VERSION:
        return f"format_version {manifest.get('format_version')!r}, expected {MANIFEST_VERSION}"
    if manifest.get("algorithm") not in hashlib.algorithms_available:
        return f"unknown hash algorithm {manifest.get('algorithm')!r}"
    for name, entry in manifest["files"].items():
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts:
            return f"file name {name!r} points outside the checkpoint"
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("hash"), str)):
            return f"malformed entry for {name!r}"
    return None


# ---------------------------------------------------------------------------- safe unpickling

_ALLOWED_GLOBALS = None


def _allowed_globals() -> dict:
    """(module, name) -> object a torch_dist `.metadata` pickle may refer to: the data
    classes and enums of torch.distributed.checkpoint's metadata and planner modules (pure
    field holders), its per-item storage info, torch.Size / dtypes / device / layouts, and
    plain containers. Exact names only: a module-wide allowance would also hand out whatever
    that module imported (os, torch.load, ...)."""
    global _ALLOWED_GLOBALS
    if _ALLOWED_GLOBALS is not None:
        return _ALLOWED_GLOBALS
    import builtins
    import collections
    import copyreg

    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = {}
    for module in (metadata, planner):
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and obj.__module__ == module.__name__
                    and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))):
                allowed[(module.__name__, name)] = obj
    for name in ("_StorageInfo", "_StoragePrefix"):
        if hasattr(filesystem, name):
            allowed[(filesystem.__name__, name)] = getattr(filesystem, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in ("dict", "list", "tuple", "set", "frozenset", "slice", "bytearray", "object",
                 "int", "float", "complex", "bool", "str", "bytes"):
        allowed[("builtins", name)] = getattr(builtins, name)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("copyreg", "_reconstructor")] = copyreg._reconstructor  # protocol 0/1 objects
    _ALLOWED_GLOBALS = allowed
    return allowed


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `_allowed_globals()`."""

    def find_class(self, module, name):
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {str(pid)[:60]!r}")


def read_dcp_metadata(directory: str):
    """The torch.distributed.checkpoint Metadata of a torch_dist checkpoint, unpickled with
    `_MetadataUnpickler` (never running code). Raises CheckpointError naming `.metadata`
    when it is unreadable or refers to anything a checkpoint never holds."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(directory, DCP_METADATA_FILE)
    try:
        with open(path, "rb") as f:
            result = _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(f"{path} refers to {e.what}, which a checkpoint never holds: "
                              f"refusing to unpickle it (the file is corrupt or was tampered "
                              f"with)") from None
    except Exception as e:  # EOFError, UnpicklingError, OSError, a class rejecting its state
        raise CheckpointError(f"{directory!r} has no readable .metadata ({type(e).__name__}): "
                              f"the checkpoint is incomplete or corrupt; copy or save it again"
                              ) from e
    if not isinstance(result, Metadata):
        raise CheckpointError(f"{path} holds a {type(result).__name__}, not a checkpoint's "
                              f"Metadata: the file is corrupt or was tampered with")
    return result


def _refusal_reason(error: Exception) -> Optional[str]:
    """What torch's weights_only unpickler refused (e.g. 'posix.system'), or None when
    `error` is not such a refusal (plain corruption)."""
    text = str(error)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return match.group(1)
    if "Weights only load failed" in text:
        lines = [l.strip() for l in text.splitlines() if "WeightsUnpickler error" in l]
        return lines[0][:200] if lines else "an object outside torch's weights_only allowlist"
    return None


def check_weights_only(data: bytes, where: str) -> Optional[str]:
    """None when `data` (a torch.save payload) loads with `weights_only=True`, else one line
    naming `where` and the problem. Megatron-LM's saved arguments (a Namespace holding
    Megatron's enums, in common.pt) are allowed: constructing them runs no code."""
    from megatron_dynamoe.checkpoint.megatron_args import unpickling_allowlist

    try:
        with torch.serialization.safe_globals(unpickling_allowlist()):
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 -- any failure is reported as one line
        what = _refusal_reason(e)
        if what is not None:
            return (f"{where} holds {what}, which a checkpoint never holds: refusing to "
                    f"unpickle it (the file is corrupt or was tampered with)")
        return (f"{where} is unreadable ({type(e).__name__}: {str(e).strip()[:150]}): the "
                f"file is corrupt; copy it again from a good copy")
    return None


def _decode_transforms(raw: bytes, descriptors, where: str) -> bytes:
    """Undo DCP's stream transforms (e.g. zstd) with torch's built-in extensions only."""
    if not descriptors:
        return raw
    try:
        from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

        stream = _StorageReaderTransforms().transform_load_stream(None, list(descriptors),
                                                                  io.BytesIO(raw))
        return stream.read(-1)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{where} is stored with the transform {list(descriptors)}, "
                              f"which this check cannot decode ({type(e).__name__}): refusing "
                              f"to load it unchecked; save the checkpoint without DCP stream "
                              f"transforms") from e


# ---------------------------------------------------------------------------- verification

@dataclasses.dataclass
class _FileTask:
    """Existence, size (manifest and .metadata) and hash of one file."""

    key: tuple
    directory: str
    name: str
    entry: Optional[dict]  # the manifest's {size, hash}, None when not hashed
    needed: int  # bytes the .metadata refers to
    algorithm: str

    @property
    def cost(self) -> int:
        return self.entry["size"] if self.entry else 0

    def run(self) -> Optional[str]:
        path = os.path.join(self.directory, self.name)
        if not os.path.isfile(path):
            return (f"{self.directory!r} is incomplete: {self.name} is missing; copy or save "
                    f"the checkpoint again")
        size = os.path.getsize(path)
        if self.entry and size != self.entry["size"]:
            state = "truncated" if size < self.entry["size"] else "longer than saved"
            return (f"checkpoint file {path} is {state} ({size} bytes, {MANIFEST_FILE} lists "
                    f"{self.entry['size']}): {_SKIP_HINT}")
        if size < self.needed:
            return (f"{path!r} is truncated ({size} bytes, the checkpoint's .metadata needs "
                    f"{self.needed}): copy or save the checkpoint again")
        if self.entry:
            read, digest = file_digest(path, self.algorithm)
            if read != self.entry["size"] or digest != self.entry["hash"]:
                return (f"checkpoint file {path} is corrupt ({self.algorithm} mismatch): "
                        f"{_SKIP_HINT}")
        return None


@dataclasses.dataclass
class _PickleTask:
    """`weights_only=True` load of a byte item (a range of a .distcp file) or of a file."""

    key: tuple
    directory: str
    name: str
    item: Optional[str] = None  # the byte item's key; None: the whole file
    offset: int = 0
    length: int = -1
    transforms: tuple = ()

    @property
    def cost(self) -> int:
        return max(self.length, 0)

    def run(self) -> Optional[str]:
        path = os.path.join(self.directory, self.name)
        where = f"checkpoint file {path}" + (f" item {self.item!r}" if self.item else "")
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                raw = f.read(self.length)
            data = _decode_transforms(raw, self.transforms, where)
        except CheckpointError as e:
            return str(e)
        except OSError as e:
            return f"{where} is unreadable ({e}): copy or save the checkpoint again"
        return check_weights_only(data, where)


@dataclasses.dataclass
class _Plan:
    tasks: list = dataclasses.field(default_factory=list)
    error: Optional[tuple] = None  # (key, line) found while planning
    metadata: object = None
    unverified: bool = False  # no manifest although checksums were asked for


def _torch_dist(directory: str) -> bool:
    from megatron.core.dist_checkpointing.core import maybe_load_config

    try:
        config = maybe_load_config(directory)
    except Exception as e:  # noqa: BLE001 -- a corrupt metadata.json
        raise CheckpointError(f"{os.path.join(directory, 'metadata.json')} is unreadable or "
                              f"corrupt ({type(e).__name__}): copy or save the checkpoint "
                              f"again") from e
    return config is not None and config.sharded_backend == "torch_dist"


def _metadata_tasks(directory: str, metadata) -> Tuple[dict, list]:
    """(file -> bytes .metadata needs, pickle tasks for common.pt and every byte item)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    needed = {COMMON_STATE_FILE: 0}
    tasks = [_PickleTask((3, 0), directory, COMMON_STATE_FILE)]
    items = metadata.state_dict_metadata
    for index, info in sorted((metadata.storage_data or {}).items(),
                              key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        if isinstance(items.get(index.fqn), BytesStorageMetadata):
            tasks.append(_PickleTask((3, len(tasks)), directory, info.relative_path,
                                     index.fqn, int(info.offset), int(info.length),
                                     tuple(getattr(info, "transform_descriptors", None) or ())))
    return needed, tasks


def _plan(directory: str, verify_checksums: bool) -> _Plan:
    """Every check of `directory` as ordered tasks (local, no collective). Keys order the
    errors: (0,) folder / manifest unusable, (1, i) file i, (2,) .metadata unreadable,
    (3, j) pickle j."""
    plan = _Plan()
    try:
        check_loadable(directory)
        manifest = read_manifest(directory) if verify_checksums else None
        torch_dist = _torch_dist(directory)
    except CheckpointError as e:
        plan.error = ((0,), str(e))
        return plan
    plan.unverified = verify_checksums and manifest is None
    needed, pickles = {}, []
    if torch_dist:
        try:
            plan.metadata = read_dcp_metadata(directory)
            needed, pickles = _metadata_tasks(directory, plan.metadata)
        except CheckpointError as e:
            plan.error = ((2,), str(e))
        except Exception as e:  # noqa: BLE001 -- a Metadata of the wrong shape
            plan.metadata = None
            plan.error = ((2,), f"{os.path.join(directory, DCP_METADATA_FILE)} is malformed "
                                f"({type(e).__name__}: {str(e)[:150]}): the file is corrupt or "
                                f"was tampered with; copy or save the checkpoint again")
    listed = manifest["files"] if manifest else {}
    algorithm = manifest["algorithm"] if manifest else HASH_ALGORITHM
    for i, name in enumerate(sorted(set(listed) | set(needed))):
        plan.tasks.append(_FileTask((1, i), directory, name, listed.get(name),
                                    needed.get(name, 0), algorithm))
    plan.tasks += pickles
    return plan


def verify_checkpoint(directory: str, verify_checksums: bool = True, collective: bool = True):
    """Check a checkpoint folder before anything is loaded from it; returns its DCP Metadata
    (read safely) or None for a backend other than torch_dist. Checks: every file of
    `checksums.json` exists with its size and hash (only the hashing is skipped with
    `verify_checksums=False`), every file `.metadata` refers to is there at full length,
    `.metadata` holds only DCP metadata classes, and common.pt and every byte item load
    with `weights_only=True`. Every rank calls it (`collective=False`: this process alone
    checks everything): the work is split over the ranks and all of them raise the same
    one-line CheckpointError, the first problem in file order."""
    rank, world = _world(collective)
    plan = _plan(directory, verify_checksums)
    owner = assign_tasks([t.cost for t in plan.tasks], world)
    first = plan.error
    for task, who in zip(plan.tasks, owner):
        if who != rank or (first is not None and first[0] < task.key):
            continue
        try:
            problem = task.run()
        except Exception as e:  # noqa: BLE001 -- an error must reach the other ranks
            problem = f"cannot check {os.path.join(directory, task.name)}: {type(e).__name__}: {e}"
        if problem:
            first = min(first, (task.key, problem)) if first else (task.key, problem)
            break
    errors = sorted(e for e in _all_gather(first, collective) if e is not None)
    if errors:
        raise CheckpointError(errors[0][1])
    if plan.unverified and rank == 0 and directory not in _noted:
        _noted.add(directory)
        print(f"note: {directory} has no {MANIFEST_FILE} (written by plain Megatron-Core or an "
              f"older megatron-dynamoe): its files cannot be verified against checksums",
              flush=True)
    return plan.metadata
