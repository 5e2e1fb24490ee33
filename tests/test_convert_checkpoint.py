"""tools/convert_checkpoint.py as a real process: Hugging Face <-> Megatron-Core torch_dist.

- SmolLM2-135M (the shipped GGUF): HF -> torch_dist -> HF folder; the folder, read by vanilla
  transformers, and the torch_dist checkpoint, loaded into our GPTModel, both reproduce the
  ORIGINAL model's logits on 2 x 64 tokens of State of the Union text;
- tiny random GPT-2 (gelu_new, tied) and LLaMA (GQA, untied): the same round trip, with exact
  weights at the end;
- a plain Megatron-Core checkpoint (no model.json) converts with --model only;
- bad input: exit 2 (3 for parity), one `error:` line, no traceback, nothing left behind.

Each tool process pays ~8 s of imports, so independent runs go two at a time (2 cores), and
the first SmolLM2 conversion runs while this process loads the original model.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.tool_runner import run_tool_here
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

from megatron_dynamoe.models.architectures import PRESETS, transformer_config
from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, load_checkpoint, read_info
from megatron_dynamoe.utils.parity import megatron_logits
from megatron_dynamoe.data.corpora import sotu_texts
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.checkpoint.hf import (SMOLLM2_GGUF, architecture_from_hf_config,
                                         find_smollm2_gguf)
from megatron_dynamoe.models.builder import build_gpt_model
from tests.builders import build_dense

pytestmark = pytest.mark.usefixtures("single_rank")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join("tools", "convert_checkpoint.py")
RELATIVE_TOLERANCE = 1e-4  # max |logit diff| <= this x max |logit| (fp32)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                 activation_function="gelu_new", bos_token_id=255, eos_token_id=255)
TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(11))


# --------------------------------------------------------------------------- helpers

def _command(*args):
    return [sys.executable, TOOL, *map(str, args)]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _run(*args, timeout=300):
    """The tool as a real process, from the repository root, as a user runs it."""
    return subprocess.run(_command(*args), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _start(*args):
    """The tool started in the background: (args, Popen) for `_finish`."""
    return args, subprocess.Popen(_command(*args), cwd=REPO, env=_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(started, timeout=600):
    args, process = started
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def _run_jobs(jobs):
    """{name: [args, args, ...]} -> {name: [CompletedProcess, ...]}: the commands of a job in
    order (stopping at the first failure), two jobs at a time."""
    def chain(commands):
        results = []
        for args in commands:
            results.append(_run(*args))
            if results[-1].returncode != 0:
                break
        return results

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(chain, commands) for name, commands in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def _assert_succeeded(result):
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


def _assert_clean_failure(result, phrase, code=2):
    assert result.returncode == code, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and phrase in last, last
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [last]


def _relative_error(candidate, reference):
    assert candidate.shape == reference.shape
    return ((candidate - reference).abs().max() / reference.abs().max()).item()


def _assert_logits_match(candidate, reference, what):
    error = _relative_error(candidate, reference)
    print(f"{what}: max |logit diff| / max |logit| = {error:.3e}")
    assert error <= RELATIVE_TOLERANCE, f"{what}: {error:.3e} > {RELATIVE_TOLERANCE}"


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _load_megatron(folder):
    """Our dense GPTModel with `folder` loaded in this process (checkpointing.load_checkpoint)."""
    arch = read_info(folder).architecture
    model = build_gpt_model(arch, transformer_config(arch))
    load_checkpoint(model, folder)
    return model.eval()


def _jitter(module, seed):
    """Non-trivial norms / biases, so that a misplaced tensor changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def _byte_tokenizer():
    """A byte-level tokenizer of exactly 256 ids (no merges), for the tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


# --------------------------------------------------------------------------- SmolLM2 (real)

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The original SmolLM2 (fp32) logits on 2 x 64 SOTU tokens, the tool's round trip
    HF -> torch_dist -> HF, and the torch_dist checkpoint's logits in our GPTModel. Work in
    this process overlaps the tool processes (2 cores): loading the original runs beside
    hf-to-megatron, loading the checkpoint beside megatron-to-hf."""
    folder = tmp_path_factory.mktemp("smollm2")
    megatron_dir, hf_dir = str(folder / "megatron"), str(folder / "hf")
    started = _start("hf-to-megatron", "--hf-model", "smollm2", "--output", megatron_dir)
    try:
        # Plain transformers, without hf_interop's GGUF loading memoisation, so that the
        # tool (which uses it) is checked against an independent load.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_folder, gguf_name = find_smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name,
                                                     dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
        ids = tokenizer(sotu_texts(limit=1)[0], add_special_tokens=False)["input_ids"]
        tokens = torch.tensor(ids[:128]).view(2, 64)
        logits = _hf_logits(model, tokens)
        del model
    finally:
        to_megatron = _finish(started)
    to_hf = megatron_model_logits = None
    if to_megatron.returncode == 0:
        started = _start("megatron-to-hf", "--load", megatron_dir, "--output", hf_dir,
                         "--tokenizer", "smollm2")
        try:
            megatron_model_logits = megatron_logits(_load_megatron(megatron_dir), tokens)
        finally:
            to_hf = _finish(started)
    return SimpleNamespace(tokens=tokens, logits=logits, megatron_dir=megatron_dir,
                           hf_dir=hf_dir, to_megatron=to_megatron, to_hf=to_hf,
                           megatron_model_logits=megatron_model_logits)


def test_smollm2_hf_to_megatron_checkpoint_loads_with_original_logits(smollm2):
    _assert_succeeded(smollm2.to_megatron)
    info = read_info(smollm2.megatron_dir)
    assert info.architecture == PRESETS["smollm2-135m"] and info.dynamoe is None
    assert info.extra["gguf_file"] == SMOLLM2_GGUF
    assert info.extra["parity"]["relative_logit_error"] <= RELATIVE_TOLERANCE
    assert info.extra["validated_layout"]["tensor_model_parallel_size"] == 1
    # checkpointing.load_checkpoint into our GPTModel, in this process (see the fixture).
    _assert_logits_match(smollm2.megatron_model_logits, smollm2.logits,
                         "smollm2 torch_dist (our GPTModel) vs original HF")


def test_smollm2_megatron_to_hf_folder_reproduces_original_logits(smollm2):
    _assert_succeeded(smollm2.to_megatron)
    _assert_succeeded(smollm2.to_hf)
    reloaded = AutoModelForCausalLM.from_pretrained(smollm2.hf_dir, dtype=torch.float32).eval()
    assert architecture_from_hf_config(reloaded.config) == PRESETS["smollm2-135m"]
    _assert_logits_match(_hf_logits(reloaded, smollm2.tokens), smollm2.logits,
                         "smollm2 HF -> torch_dist -> HF folder vs original HF")
    # The written tokenizer (from --tokenizer smollm2) gives the same ids as the original.
    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    ids = tokenizer(sotu_texts(limit=1)[0], add_special_tokens=False)["input_ids"]
    assert torch.equal(torch.tensor(ids[:128]).view(2, 64), smollm2.tokens)


# --------------------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random HF models saved with save_pretrained: LLaMA (GQA, untied, byte-level
    tokenizer), GPT-2 (gelu_new, tied, no tokenizer: parity on random ids), and a BERT."""
    root = tmp_path_factory.mktemp("tiny_hf")
    models = {}
    for name, model in (("llama", LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))),
                        ("gpt2", GPT2LMHeadModel(GPT2Config(**TINY_GPT2)))):
        _jitter(model, seed=len(models) + 1)
        model.save_pretrained(root / name)
        models[name] = model.eval()
    _byte_tokenizer().save_pretrained(root / "llama")
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=100)).save_pretrained(root / "bert")
    return SimpleNamespace(root=root, models=models, llama=str(root / "llama"),
                           gpt2=str(root / "gpt2"), bert=str(root / "bert"))


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """Our dense tiny LLaMA saved by plain Megatron-Core (dist_checkpointing.save, no
    model.json), and its logits on TOKENS."""
    from megatron.core import dist_checkpointing

    folder = tmp_path_factory.mktemp("plain") / "megatron"
    folder.mkdir()
    model = build_dense(seed=7)
    _jitter(model, seed=8)
    dist_checkpointing.save(model.sharded_state_dict(), str(folder))
    assert not (folder / "model.json").exists()
    return SimpleNamespace(folder=str(folder), logits=megatron_logits(model, TOKENS))


# Bad input: (arguments, exit code, phrase of the error line). {name} placeholders are filled
# from `_bad_input_setup`; every case writes to its own empty folder's "result".
# The parity failure runs as the tool's own process (the exit code a shell sees end to end).
BAD_INPUT = {
    "parity_failure": (["hf-to-megatron", "--hf-model", "{gpt2}", "--output", "{out}",
                        "--tolerance", "0"],
                       3, "parity check failed"),
}
# Failures that stop before the conversion writes anything: run through the tool's `main` and
# `run_tool` in this process (no ~8 s of imports each; `run_tool` is what the tool's process
# runs too, and the exit code is its return value).
BAD_INPUT_IN_PROCESS = {
    "missing_hf_folder": (["hf-to-megatron", "--hf-model", "{absent}", "--output", "{out}"],
                          2, "does not exist"),
    "missing_gguf_file": (["hf-to-megatron", "--hf-model", "{llama}", "--gguf-file",
                           "absent.gguf", "--output", "{out}"],
                          2, "GGUF file 'absent.gguf' is not in"),
    "unknown_model_family": (["hf-to-megatron", "--hf-model", "{bert}", "--output", "{out}"],
                             2, "model_type 'bert'"),
    "layout_not_dividing": (["hf-to-megatron", "--hf-model", "{llama}", "--output", "{out}",
                             "--tensor-model-parallel-size", "3"],
                            2, "TP=3 must divide the attention heads (4)"),
    "existing_output": (["hf-to-megatron", "--hf-model", "{llama}", "--output", "{existing}"],
                        2, "exists; pass --overwrite"),
    "missing_load_folder": (["megatron-to-hf", "--load", "{absent}", "--output", "{out}"],
                            2, "--load folder"),
    "truncated_distcp": (["megatron-to-hf", "--load", "{truncated}", "--model", "tiny-llama",
                          "--output", "{out}"],
                         2, "__0_0.distcp' is truncated"),
    "architecture_mismatch": (["megatron-to-hf", "--load", "{plain}", "--model", "tiny-gpt2",
                               "--output", "{out}"],
                              2, "does not match the architecture of --model tiny-gpt2"),
    "plain_without_model": (["megatron-to-hf", "--load", "{plain}", "--output", "{out}"],
                            2, "pass --model PRESET"),
    "deleted_distcp": (["megatron-to-hf", "--load", "{deleted}", "--model", "tiny-llama",
                        "--output", "{out}"],
                       2, "__0_0.distcp is missing"),
    "load_not_a_checkpoint": (["megatron-to-hf", "--load", "{llama}", "--output", "{out}"],
                              2, "no metadata.json"),
    "dynamoe_checkpoint": (["megatron-to-hf", "--load", "{dynamoe}", "--output", "{out}"],
                           2, "tools/export.py"),
    "expert_parallel_for_dense": (["hf-to-megatron", "--hf-model", "{llama}", "--output",
                                   "{out}", "--expert-model-parallel-size", "2"],
                                  2, "has no experts"),
    "output_is_the_input": (["megatron-to-hf", "--load", "{plain}", "--output", "{plain}",
                             "--overwrite"],
                            2, "is the input"),
}


def _run_here(*args):
    """The tool's `main` in this process (see tests/tool_runner.py)."""
    return run_tool_here(TOOL, *args)


def _bad_input_setup(tiny, plain, root):
    """Folders the bad-input cases point at."""
    paths = dict(absent=str(root / "absent"), llama=tiny.llama, gpt2=tiny.gpt2, bert=tiny.bert,
                 plain=plain.folder, existing=str(root / "existing"))
    os.makedirs(paths["existing"])
    with open(os.path.join(paths["existing"], "keep.txt"), "w") as f:
        f.write("untouched")
    for name in ("truncated", "deleted", "dynamoe"):
        paths[name] = str(root / name)
        shutil.copytree(plain.folder, paths[name])
    shard = os.path.join(paths["truncated"], "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    os.remove(os.path.join(paths["deleted"], "__0_0.distcp"))
    with open(os.path.join(paths["dynamoe"], "model.json"), "w") as f:
        json.dump(CheckpointInfo(PRESETS["tiny-llama"], DynaMoEConfig(), {}).to_json(), f)
    return paths


@pytest.fixture(scope="module")
def tiny_runs(tiny, plain_checkpoint, tmp_path_factory):
    """Every tiny-model tool run of this file, two at a time: the HF -> Megatron -> HF round
    trips, the plain checkpoint conversion and the bad-input cases."""
    root = tmp_path_factory.mktemp("tiny_runs")
    # The GPT-2 round trip replaces a stale folder (--overwrite); the LLaMA one validates a
    # TP=2 x PP=2 target layout and writes the tokenizer.
    os.makedirs(root / "gpt2_hf")
    (root / "gpt2_hf" / "stale.txt").write_text("stale")
    jobs = {
        "llama": [["hf-to-megatron", "--hf-model", tiny.llama, "--output", root / "llama_mc",
                   "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                  ["megatron-to-hf", "--load", root / "llama_mc", "--output", root / "llama_hf",
                   "--tokenizer", tiny.llama]],
        "gpt2": [["hf-to-megatron", "--hf-model", tiny.gpt2, "--output", root / "gpt2_mc"],
                 ["megatron-to-hf", "--load", root / "gpt2_mc", "--output", root / "gpt2_hf",
                  "--overwrite"]],
        "plain": [["megatron-to-hf", "--load", plain_checkpoint.folder, "--model", "tiny-llama",
                   "--output", root / "plain_hf"]],
    }
    paths = _bad_input_setup(tiny, plain_checkpoint, root)
    outputs, arguments = {}, {}
    for case, (args, _, _) in {**BAD_INPUT, **BAD_INPUT_IN_PROCESS}.items():
        os.makedirs(root / f"out_{case}")
        outputs[case] = str(root / f"out_{case}" / "result")
        arguments[case] = [a.format(out=outputs[case], **paths) for a in args]
    runs = _run_jobs({**jobs, **{case: [arguments[case]] for case in BAD_INPUT}})
    return SimpleNamespace(root=root, runs=runs, outputs=outputs, paths=paths,
                           arguments=arguments)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_round_trip_hf_megatron_hf(tiny, tiny_runs, family):
    for result in tiny_runs.runs[family]:
        _assert_succeeded(result)
    assert len(tiny_runs.runs[family]) == 2
    original = tiny.models[family]
    reference = _hf_logits(original, TOKENS)
    preset = PRESETS[f"tiny-{family}"]

    megatron_dir = str(tiny_runs.root / f"{family}_mc")
    info = read_info(megatron_dir)
    assert info.architecture == preset and info.dynamoe is None
    assert info.extra["parity"]["relative_logit_error"] <= RELATIVE_TOLERANCE
    _assert_logits_match(megatron_logits(_load_megatron(megatron_dir), TOKENS), reference,
                         f"tiny {family} torch_dist (our GPTModel) vs original HF")

    hf_dir = tiny_runs.root / f"{family}_hf"
    reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert architecture_from_hf_config(reloaded.config) == preset
    written = reloaded.state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(written[name], tensor), name  # the round trip copies, exactly
    _assert_logits_match(_hf_logits(reloaded, TOKENS), reference,
                         f"tiny {family} HF -> torch_dist -> HF folder vs original HF")

    if family == "gpt2":
        assert reloaded.config.activation_function == "gelu_new"
        assert reloaded.config.tie_word_embeddings
        assert not (hf_dir / "stale.txt").exists()  # --overwrite replaced the old folder
        assert "random token ids" in tiny_runs.runs[family][0].stderr  # no tokenizer there
    else:
        assert info.extra["validated_layout"] == dict(tensor_model_parallel_size=2,
                                                      pipeline_model_parallel_size=2,
                                                      expert_model_parallel_size=1)
        text = sotu_texts(limit=1)[0][:2000]
        assert (AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
                == AutoTokenizer.from_pretrained(tiny.llama)(text)["input_ids"])
        assert "tokens of 'sotu' text" in tiny_runs.runs[family][0].stderr


def test_plain_megatron_checkpoint_converts_with_model_flag(plain_checkpoint, tiny_runs):
    (result,) = tiny_runs.runs["plain"]
    _assert_succeeded(result)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_runs.root / "plain_hf",
                                                    dtype=torch.float32).eval()
    assert architecture_from_hf_config(reloaded.config) == PRESETS["tiny-llama"]
    _assert_logits_match(_hf_logits(reloaded, TOKENS), plain_checkpoint.logits,
                         "plain Megatron-Core checkpoint -> HF folder vs Megatron")
    # Without --model the same checkpoint is refused with one line naming the flag.
    refused = _run_here(*tiny_runs.arguments["plain_without_model"])
    _assert_clean_failure(refused, "pass --model PRESET")


@pytest.mark.parametrize("case", sorted(BAD_INPUT) + sorted(BAD_INPUT_IN_PROCESS))
def test_bad_input_fails_cleanly_and_leaves_nothing(tiny_runs, case):
    if case in BAD_INPUT:
        _, code, phrase = BAD_INPUT[case]
        (result,) = tiny_runs.runs[case]
    else:
        _, code, phrase = BAD_INPUT_IN_PROCESS[case]
        result = _run_here(*tiny_runs.arguments[case])
    _assert_clean_failure(result, phrase, code)
    # Nothing written: the case's folder is still empty (no output, no .result.tmp-* sibling).
    assert os.listdir(os.path.dirname(tiny_runs.outputs[case])) == []
    if case == "existing_output":
        existing = tiny_runs.paths["existing"]
        assert os.listdir(existing) == ["keep.txt"]
        with open(os.path.join(existing, "keep.txt")) as f:
            assert f.read() == "untouched"
        assert [n for n in os.listdir(os.path.dirname(existing)) if ".tmp-" in n] == []
