"""The data layer (megatron_dynamoe.data) and tools/preprocess_data.py, checked by numbers.

- preprocessing with the real SmolLM2 tokenizer: the .bin/.idx read back by Megatron's
  IndexedDataset equals the tokenizer's ids + EOD per document, exactly;
- GPTDataset samples: shapes, labels = tokens shifted by one, every sample a window of the
  document stream in GPTDataset's own order, loss mask / positions with the EOD flags;
- a 0.75 / 0.25 blend draws samples in those proportions (counted from the blend's index);
- the micro-batch sampler: deterministic, split across 2 DP ranks (disjoint, union = the
  single-rank order), resuming at consumed_samples = k gives batches k.. of a full pass;
- the pure-Python dataset helpers equal Megatron's compiled ones;
- the DataLoader-worker batch loader: the source's batches in the planned order, held for a
  second reader, refused out of order;
- bad input: one clear line, nothing left behind.
"""

import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from megatron_dynamoe.data import helpers
from megatron_dynamoe.data.datasets import build_gpt_datasets
from megatron_dynamoe.data.errors import DataError
from megatron_dynamoe.data.indexed import indexed_dataset_writer
from megatron_dynamoe.data.sampling import MicroBatchSampler, micro_batches
from megatron_dynamoe.data.tokenizer import HFTokenizerAdapter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = 2  # SmolLM2's EOS, <|im_end|>

pytestmark = pytest.mark.usefixtures("single_rank")


# --------------------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(HF tokenizer loaded from the shipped GGUF, the same tokenizer saved as an HF folder
    that reloads in < 1 s for tool runs)."""
    from megatron_dynamoe.checkpoint.hf import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    folder = str(tmp_path_factory.mktemp("tok") / "smollm2")
    tokenizer.save_pretrained(folder)
    return tokenizer, folder


@pytest.fixture(scope="module")
def adapter(smollm2):
    return HFTokenizerAdapter(smollm2[0], "smollm2")


def _documents(seed, count, low, high, min_len=5, max_len=80):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(low, high, rng.integers(min_len, max_len))) + [EOD]
            for _ in range(count)]


def _write(prefix, documents, vocab_size=49152):
    with indexed_dataset_writer(prefix, vocab_size) as writer:
        for ids in documents:
            writer.add_document(ids)
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two synthetic indexed datasets: A (ids 100..999) and B (ids 1000..1999), EOD-terminated."""
    folder = tmp_path_factory.mktemp("corpus")
    docs_a = _documents(1, 300, 100, 1000)
    docs_b = _documents(2, 300, 1000, 2000)
    return dict(a=_write(str(folder / "a"), docs_a), b=_write(str(folder / "b"), docs_b),
                docs_a=docs_a, docs_b=docs_b, folder=folder)


def _load_tool():
    import megatron_dynamoe.cli.preprocess_data as module

    return module


def _tool_here(*args):
    """tools/preprocess_data.py's main in this process through run_tool; stdout and stderr
    captured (what subprocess.run would return)."""
    from megatron_dynamoe.cli.common import run_tool

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_tool(_load_tool().main, [str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _tool(*args):
    """The tool as a real process."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"),
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _assert_clean_failure(result, phrase):
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, last
    assert "Traceback" not in result.stderr


def _leftovers(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(folder), ".*tmp-*")))


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return dataset, [dataset[i].tolist() for i in range(len(dataset))]


# --------------------------------------------------------------------------- helpers backend

def test_compiled_helpers_ship_with_megatron_core_and_python_ones_match():
    """0.16.1's wheel ships helpers_cpp compiled; the Python stand-in returns the same arrays."""
    assert helpers.dataset_helpers_backend() == "compiled"
    from megatron.core.datasets import helpers_cpp

    rng = np.random.default_rng(0)
    for trial in range(24):
        sizes = rng.integers(1 if trial % 3 else 0, 50, 40).astype(np.int32)
        sizes[0] = max(sizes[0], 2)
        epochs = int(rng.integers(1, 4))
        document_idx = np.tile(np.arange(40, dtype=np.int32), epochs)
        rng.shuffle(document_idx)
        tokens = int(sizes.sum())
        seq = int(rng.integers(2, 70))
        for drop_last in (True, False):
            for extra in (0, 1):
                for bits, compiled in ((np.int32, helpers_cpp.build_sample_idx_int32),
                                       (np.int64, helpers_cpp.build_sample_idx_int64)):
                    want = compiled(sizes, document_idx, seq, epochs, tokens, drop_last, extra)
                    got = helpers.py_build_sample_idx(sizes, document_idx, seq, epochs, tokens,
                                                      drop_last, extra, dtype=bits)
                    assert got.dtype == want.dtype and np.array_equal(got, want), \
                        (trial, drop_last, extra)
    for weights in ([0.75, 0.25], [0.5, 0.3, 0.2], [0.1, 0.9]):
        size = 997
        want = (np.zeros(size, np.int16), np.zeros(size, np.int64))
        got = (np.zeros(size, np.int16), np.zeros(size, np.int64))
        helpers_cpp.build_blending_indices(*want, np.array(weights), len(weights), size, False)
        helpers.py_build_blending_indices(*got, np.array(weights), len(weights), size, False)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    sizes = np.array([30, 7, 19], dtype=np.int64)
    want = (np.zeros(56, np.int16), np.zeros(56, np.int64))
    got = (np.zeros(56, np.int16), np.zeros(56, np.int64))
    helpers_cpp.build_exhaustive_blending_indices(*want, sizes, 3)
    helpers.py_build_exhaustive_blending_indices(*got, sizes, 3)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


# --------------------------------------------------------------------------- preprocessing

def test_preprocess_jsonl_and_text_read_back_exactly(smollm2, tmp_path):
    tokenizer, folder = smollm2
    records = [{"body": "The Congress shall have power to lay and collect taxes."},
               {"body": ""},  # tokenizes to nothing: skipped
               {"body": "Ünïcödé — 漢字 and emoji 🎉\nsecond line\n\n  indented"},
               {"body": "short"}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    text = tmp_path / "speech.txt"
    text.write_text("Fellow citizens, the state of the Union is strong.\n", encoding="utf-8")
    prefix = tmp_path / "out" / "docs"
    result = _tool_here("--input", jsonl, text, "--json-key", "body", "--tokenizer", folder,
                        "--output-prefix", prefix)
    assert result.returncode == 0, result.stderr
    texts = [r["body"] for r in records if r["body"]] + [text.read_text(encoding="utf-8")]
    expected = [tokenizer(t, add_special_tokens=False).input_ids + [EOD] for t in texts]
    dataset, got = _read_back(str(prefix))
    assert got == expected
    assert dataset.index.dtype == np.uint16
    assert list(dataset.document_indices) == list(range(len(texts) + 1))
    assert (f"{len(texts)} documents, {sum(map(len, expected))} tokens" in result.stdout
            and "1 empty documents skipped" in result.stdout), result.stdout
    assert _leftovers(prefix.parent) == []


def test_preprocess_shipped_corpus_as_a_real_process(smollm2, tmp_path):
    from megatron_dynamoe.data.corpora import load_texts

    tokenizer, folder = smollm2
    prefix = tmp_path / "sotu3"
    result = _tool("--input", "sotu", "--limit", 3, "--tokenizer", folder,
                   "--output-prefix", prefix)
    assert result.returncode == 0, result.stderr
    expected = [tokenizer(t, add_special_tokens=False).input_ids + [EOD]
                for t in load_texts("sotu", 3)]
    assert _read_back(str(prefix))[1] == expected
    assert f"3 documents, {sum(map(len, expected))} tokens" in result.stdout


# --------------------------------------------------------------------------- GPT datasets

def _stream(dataset, documents):
    """The token stream GPTDataset cuts samples from: documents in its document_index order."""
    return np.concatenate([documents[d] for d in dataset.document_index]).astype(np.int64)


def test_gpt_dataset_samples_are_windows_of_the_document_stream(adapter, corpus, tmp_path):
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_dynamoe.models.builder import causal_attention_mask

    seq = 32
    train, valid, test = build_gpt_datasets(corpus["a"], adapter, seq_length=seq,
                                            num_samples=(300, 20, 0), split="90,10,0",
                                            seed=5, cache_path=tmp_path / "cache")
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert len(train) >= 300 and len(valid) >= 20
    # Megatron's split: the first round(0.9 x 300) documents train, the rest validate.
    assert set(np.unique(train.document_index)) == set(range(270))
    assert set(np.unique(valid.document_index)) == set(range(270, 300))
    stream = _stream(train, corpus["docs_a"])
    mask = causal_attention_mask(seq)[0]
    for k in range(0, len(train), 7):
        sample = train[k]
        start = int(train.shuffle_index[k]) * seq
        assert sample["tokens"].shape == (seq,) and sample["tokens"].dtype == torch.int64
        assert torch.equal(sample["tokens"], torch.from_numpy(stream[start:start + seq]))
        assert torch.equal(sample["labels"], torch.from_numpy(stream[start + 1:start + seq + 1]))
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert torch.equal(sample["loss_mask"], torch.ones(seq))
        assert torch.equal(sample["position_ids"], torch.arange(seq))
        assert torch.equal(sample["attention_mask"], mask)

    batch = next(micro_batches(train, 4))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (4, seq), "labels": (4, seq), "loss_mask": (4, seq),
        "position_ids": (4, seq), "attention_mask": (1, 1, seq, seq)}
    assert batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["attention_mask"], causal_attention_mask(seq))
    assert torch.equal(batch["tokens"][1], train[1]["tokens"])


def test_eod_flags_mask_loss_and_reset_positions(adapter, corpus, tmp_path):
    seq = 64
    train = build_gpt_datasets(corpus["a"], adapter, seq_length=seq, num_samples=(50, 5, 0),
                               split="90,10,0", cache_path=tmp_path / "cache",
                               eod_mask_loss=True, reset_position_ids=True,
                               reset_attention_mask=True).train
    seen_eod = 0
    for k in range(50):
        sample = train[k]
        tokens = sample["tokens"]
        assert torch.equal(sample["loss_mask"], (tokens != EOD).float())
        expected_positions, position = [], 0
        for token in tokens.tolist():
            expected_positions.append(position)
            position = 0 if token == EOD else position + 1
        assert sample["position_ids"].tolist() == expected_positions
        seen_eod += int((tokens == EOD).sum())
    assert seen_eod > 0
    batch = next(micro_batches(train, 3))
    assert tuple(batch["attention_mask"].shape) == (3, 1, seq, seq)  # per-sample masks


def test_blend_draws_samples_in_weight_proportions(adapter, corpus, tmp_path):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    train, valid, _ = build_gpt_datasets(["0.75", corpus["a"], "0.25", corpus["b"]], adapter,
                                         seq_length=16, num_samples=(2000, 40, 0),
                                         split="95,5,0", cache_path=tmp_path / "cache")
    assert isinstance(train, BlendedDataset) and len(train) == 2000
    counts = np.bincount(np.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] / 2000 - 0.75) <= 0.02 and abs(counts[1] / 2000 - 0.25) <= 0.02
    first = np.bincount(np.asarray(train.dataset_index[:200]), minlength=2)
    assert abs(first[0] / 200 - 0.75) <= 0.02  # interleaved, not one dataset after the other
    ranges = {0: (100, 1000), 1: (1000, 2000)}
    for k in range(0, 2000, 37):
        sample = train[k]
        low, high = ranges[int(sample["dataset_id"])]
        text = sample["tokens"][sample["tokens"] != EOD]
        assert bool(((text >= low) & (text < high)).all())


def test_index_cache_is_reused_and_keyed_by_the_data(adapter, corpus, tmp_path):
    cache = tmp_path / "cache"
    prefix = _write(str(tmp_path / "c"), corpus["docs_a"][:100])
    kwargs = dict(seq_length=16, num_samples=(100, 10, 0), split="90,10,0", cache_path=cache)
    first = build_gpt_datasets(prefix, adapter, **kwargs).train
    files = {p: os.path.getmtime(p) for p in glob.glob(str(cache / "*" / "*.npy"))}
    assert len(files) == 6 and len(os.listdir(cache)) == 1
    again = build_gpt_datasets(prefix, adapter, **kwargs).train
    assert {p: os.path.getmtime(p) for p in files} == files  # loaded, not rebuilt
    assert np.array_equal(first.shuffle_index, again.shuffle_index)
    _write_over = indexed_dataset_writer(prefix, 49152, overwrite=True)
    with _write_over as writer:
        for ids in corpus["docs_b"][:100]:
            writer.add_document(ids)
    changed = build_gpt_datasets(prefix, adapter, **kwargs).train
    assert len(os.listdir(cache)) == 2  # new data, new index folder: never a stale index
    assert int(changed[0]["tokens"][changed[0]["tokens"] != EOD].min()) >= 1000


# --------------------------------------------------------------------------- sampler

def test_sampler_splits_across_dp_ranks_and_resumes_exactly():
    total, mbs = 103, 3
    single = [b for b in MicroBatchSampler(total, 0, mbs)]
    flat = [i for b in single for i in b]
    assert flat == list(range(total - total % mbs))
    ranks = [list(MicroBatchSampler(total, 0, mbs, dp_rank=r, dp_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == total // (2 * mbs)
    seen = [set(i for b in batches for i in b) for batches in ranks]
    assert not seen[0] & seen[1]
    interleaved = [i for b0, b1 in zip(*ranks) for i in b0 + b1]
    assert interleaved == flat[:len(interleaved)]  # the single-rank order, step by step
    for k_steps in (0, 1, 5, len(ranks[0])):
        consumed = k_steps * mbs * 2
        for r in (0, 1):
            resumed = list(MicroBatchSampler(total, consumed, mbs, dp_rank=r, dp_size=2))
            assert resumed == ranks[r][k_steps:]
    with pytest.raises(DataError, match="consumed_samples=200"):
        MicroBatchSampler(total, 200, mbs)
    with pytest.raises(DataError, match="dp_rank 2"):
        MicroBatchSampler(total, 0, mbs, dp_rank=2, dp_size=2)


def test_batch_loader_reads_the_planned_positions_ahead_in_workers():
    """`run_positions` is the trainer's order (iteration by iteration, each DP rank's
    micro-batch starts); a `BatchLoader` with 2 forked workers returns the source's batches
    there bit for bit, serves a held batch again (the teacher's, then the student's read),
    drops what `release_before` releases, reads on after SIGTERM reaches a worker, and
    refuses a position off its plan in one line."""
    from megatron_dynamoe.data.batch_loader import BatchLoader, run_positions
    from megatron_dynamoe.data.sampling import micro_batch_starts

    def source(position, mbs):
        rows = torch.arange(position, position + mbs, dtype=torch.long)
        return {"tokens": rows[:, None] * 100 + torch.arange(5), "pid": torch.tensor(os.getpid())}

    gbs, mbs, micro, dp = 8, 2, 2, 2
    for rank in range(dp):
        planned = list(run_positions(16, gbs, 3, mbs, micro, rank, dp))
        assert planned == [p for it in range(3)
                           for p in micro_batch_starts(16 + it * gbs, mbs, micro, rank, dp)]
    positions = lambda: run_positions(16, gbs, 3, mbs, micro, 1, dp)  # noqa: E731
    loader = BatchLoader(source, mbs, positions, 6, num_workers=2)
    try:
        for it in range(3):
            start = 16 + it * gbs
            loader.release_before(start)
            wanted = micro_batch_starts(start, mbs, micro, 1, dp)
            for reader in ("teacher", "student"):
                for position in wanted:
                    batch = loader(position, mbs)
                    assert torch.equal(batch["tokens"], source(position, mbs)["tokens"])
                    assert int(batch["pid"]) != os.getpid()  # read in a worker process
            assert loader.held_positions() == wanted
            if it == 0:
                # A job's preemption signal reaches the workers too (SLURM and torchrun
                # signal the process group): they ignore it and keep reading.
                os.kill(int(batch["pid"]), signal.SIGTERM)
                time.sleep(0.5)
        with pytest.raises(DataError, match="asked for sample position 18, which is not"):
            loader(18, mbs)
        with pytest.raises(DataError, match="micro-batches of 2 samples, not 3"):
            loader(34, 3)
    finally:
        loader.close()
    assert loader.held_positions() == []
    with pytest.raises(DataError, match="at least one worker"):
        BatchLoader(source, mbs, positions, 6, num_workers=0)


def test_micro_batches_are_deterministic_and_resume_at_consumed_samples(adapter, corpus,
                                                                        tmp_path):
    def build(seed, cache):
        return build_gpt_datasets(["0.75", corpus["a"], "0.25", corpus["b"]], adapter,
                                  seq_length=16, num_samples=(96, 8, 0), split="90,10,0",
                                  seed=seed, cache_path=tmp_path / cache).train

    train = build(7, "c1")
    dp, mbs = 2, 4
    full = [list(micro_batches(train, mbs, dp_rank=r, dp_size=dp)) for r in range(dp)]
    assert len(full[0]) == 12
    single = list(micro_batches(train, mbs * dp))
    for step in range(12):
        joined = torch.cat([full[0][step]["tokens"], full[1][step]["tokens"]])
        assert torch.equal(joined, single[step]["tokens"])
    consumed = 5 * mbs * dp  # a checkpoint after 5 micro-batch steps
    for r in range(dp):
        resumed = list(micro_batches(train, mbs, consumed_samples=consumed, dp_rank=r,
                                     dp_size=dp))
        assert len(resumed) == 7
        for a, b in zip(resumed, full[r][5:]):
            assert all(torch.equal(a[key], b[key]) for key in ("tokens", "labels", "loss_mask",
                                                                "position_ids"))
    rebuilt = build(7, "c2")  # same seed, fresh cache: the same batches
    assert torch.equal(next(micro_batches(rebuilt, mbs))["tokens"], full[0][0]["tokens"])
    other = build(8, "c3")
    assert not torch.equal(next(micro_batches(other, mbs))["tokens"],
                           full[0][0]["tokens"])


# --------------------------------------------------------------------------- bad input

def test_bad_data_inputs_fail_with_one_clear_line(adapter, corpus, tmp_path):
    cache = tmp_path / "cache"
    build = lambda path, **kw: build_gpt_datasets(  # noqa: E731
        path, adapter, **{**dict(seq_length=16, num_samples=(10, 2, 0), split="90,10,0",
                                 cache_path=cache), **kw})
    missing = tmp_path / "lonely"
    (tmp_path / "lonely.bin").write_bytes(b"")
    broken = str(tmp_path / "broken")
    _write(broken, corpus["docs_a"][:20])
    with open(broken + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    cut = str(tmp_path / "cut")
    _write(cut, corpus["docs_a"][:20])
    with open(cut + ".idx", "r+b") as f:
        f.truncate(60)
    short = str(tmp_path / "short")
    _write(short, corpus["docs_a"][:20])
    with open(short + ".bin", "r+b") as f:
        f.truncate(100)
    cases = [
        (lambda: build(str(missing)), "lonely.idx not found"),
        (lambda: build(str(tmp_path / "nothing")), "nothing.bin and"),
        (lambda: build(broken), "broken.idx: not a Megatron index (bad header)"),
        (lambda: build(cut), "cut.idx: 60 bytes cannot hold 20 sequences"),
        (lambda: build(short), "the pair is corrupt or mismatched"),
        (lambda: build(["0.75", corpus["a"], "-0.25", corpus["b"]]), "must be a finite number"),
        (lambda: build(["0.75", corpus["a"], corpus["b"]]), "bad data blend"),
        (lambda: build(corpus["a"], seq_length=20000),
         "train split (documents 0..270 of 300) holds"),
        (lambda: build(corpus["a"], split="99,1,0", seq_length=300),
         "valid split (documents 297..300 of 300) holds"),
        (lambda: build(corpus["a"], split="90,-10"), "bad split"),
        (lambda: build(corpus["a"], num_samples=(10, 2)), "num_samples must give"),
    ]
    for call, phrase in cases:
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert phrase in message and "\n" not in message, message
    assert not cache.exists()  # nothing was built or cached


def test_preprocess_bad_inputs_leave_nothing_behind(smollm2, tmp_path):
    _, folder = smollm2
    out = tmp_path / "out"
    _assert_clean_failure(_tool_here("--input", "wikipedia", "--tokenizer", folder,
                                     "--output-prefix", out / "x"), "text source 'wikipedia'")
    assert not out.exists()

    # Existing output: refused without --overwrite, untouched; replaced with it.
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n{"text": "two three"}\n')
    assert _tool_here("--input", jsonl, "--tokenizer", folder,
                      "--output-prefix", out / "x").returncode == 0
    before = {p: open(p, "rb").read() for p in glob.glob(str(out / "x.*"))}
    assert len(before) == 2
    _assert_clean_failure(_tool_here("--input", "sotu", "--tokenizer", folder,
                                     "--output-prefix", out / "x"), "pass --overwrite")
    assert {p: open(p, "rb").read() for p in before} == before

    # A bad record half-way: the error names the line, the old pair survives, no temp files.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    _assert_clean_failure(_tool_here("--input", bad, "--tokenizer", folder, "--output-prefix",
                                     out / "x", "--overwrite"), "bad.jsonl:2: no field 'text'")
    assert {p: open(p, "rb").read() for p in before} == before
    _assert_clean_failure(_tool_here("--input", bad, "--tokenizer", folder, "--output-prefix",
                                     out / "y"), "bad.jsonl:2")
    assert not glob.glob(str(out / "y.*")) and _leftovers(out) == []

    # --overwrite replaces both files together.
    other = tmp_path / "other.jsonl"
    other.write_text('{"txt": "replaced"}\n')
    assert _tool_here("--input", other, "--json-key", "txt", "--tokenizer", folder,
                      "--output-prefix", out / "x", "--overwrite").returncode == 0
    assert len(_read_back(str(out / "x"))[1]) == 1 and _leftovers(out) == []
    _assert_clean_failure(_tool_here("--input", jsonl, "--tokenizer", folder,
                                     "--output-prefix", str(tmp_path) + os.sep),
                          "must name files")


# --------------------------------------------------------------------------- two real ranks

class _StubTokenizer:
    """What HFTokenizerAdapter reads from a Hugging Face tokenizer, for spawned workers."""

    eos_token_id = EOD

    def __len__(self):
        return 49152


def _two_rank_worker(rank, world_size, prefixes, cache, out):
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    initialize_parallel(ParallelLayout())
    train = build_gpt_datasets(["0.75", prefixes[0], "0.25", prefixes[1]],
                               HFTokenizerAdapter(_StubTokenizer(), "stub"), seq_length=16,
                               num_samples=(64, 8, 0), split="90,10,0", cache_path=cache).train
    batches = list(micro_batches(train, 4, consumed_samples=8, dp_rank=rank,
                                 dp_size=world_size))
    torch.save(torch.stack([b["tokens"] for b in batches]), os.path.join(out, f"{rank}.pt"))


@pytest.mark.multiproc
def test_two_ranks_build_once_and_read_their_shares(corpus, tmp_path):
    """Rank 0 builds the indices, rank 1 loads them after Megatron's barrier; each DP rank
    reads its slice: together, from consumed_samples = 8 on, the single-process order."""
    from tests.multiproc import run_processes

    prefixes = [corpus["a"], corpus["b"]]
    run_processes(_two_rank_worker, 2, prefixes, str(tmp_path / "cache"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    single = build_gpt_datasets(["0.75", prefixes[0], "0.25", prefixes[1]],
                                HFTokenizerAdapter(_StubTokenizer(), "stub"), seq_length=16,
                                num_samples=(64, 8, 0), split="90,10,0",
                                cache_path=tmp_path / "cache").train
    want = torch.stack([single[i]["tokens"] for i in range(8, 64)])
    got = torch.cat([torch.cat([r0, r1]) for r0, r1 in zip(*ranks)])
    assert torch.equal(got, want)
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_data_path_words_quoted_or_not(tmp_path):
    """--data-path as separate words or as one quoted string (a job script's variable) reads
    the same blend; an existing prefix whose name holds a space stays one path."""
    from megatron_dynamoe.data.blend import parse_blend

    blend = (["a", "b"], [0.7, 0.3])
    assert parse_blend(["0.7", "a", "0.3", "b"]) == blend
    assert parse_blend(["0.7 a 0.3 b"]) == parse_blend("0.7 a 0.3 b") == blend
    assert parse_blend(["0.7 a", "0.3 b.bin"]) == blend
    assert parse_blend(["a b"]) == (["a", "b"], None)
    spaced = str(tmp_path / "my data")
    open(spaced + ".bin", "wb").close()
    assert parse_blend([spaced]) == ([spaced], None)
    assert parse_blend(["0.5", spaced, "0.5", "b"]) == ([spaced, "b"], [0.5, 0.5])
    with pytest.raises(DataError, match="bad data blend '0.7 a 0.3'"):
        parse_blend(["0.7 a 0.3"])
