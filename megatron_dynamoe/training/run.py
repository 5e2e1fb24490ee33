"""One training run from a validated TrainConfig: the model and data it names, the parallel
world, the --save claim, the trainer, and the exit code (`utils.errors`: 0, 2 bad input,
4 diverged, 5 a collective timed out). `megatron_dynamoe.cli.train` (launch/train.py,
dynamoe-train) parses the flags and calls `run_training`; a Python caller can do the same.
"""

from __future__ import annotations

import dataclasses
import os
import sys


def run_training(cfg, preempted, provider_for=None) -> int:
    """Run `cfg` (a TrainConfig) to its end or a preemption and return the exit code.
    `preempted` is an installed `training.preemption.PreemptionFlag`; `provider_for(info)`
    picks the model provider (default: the family registry's)."""
    return _train(cfg, preempted, provider_for or model_provider)


def resolve_model(cfg):
    """CheckpointInfo (architecture + DynaMoE config) of the model this run trains."""
    from megatron_dynamoe.models.architectures import get_architecture
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, read_info
    from megatron_dynamoe.dynamoe.config import DynaMoEConfig
    from megatron_dynamoe.checkpoint.save_folder import latest_checkpoint

    # The trainer's order: --load's latest training checkpoint, else --pretrained-checkpoint,
    # else --load as a model checkpoint. So one command serves the first start (empty --load
    # folder) and every requeue after it.
    info = None
    latest = latest_checkpoint(cfg.load) if cfg.load and os.path.isdir(cfg.load) else None
    if latest:
        info = read_info(latest[1])
    elif cfg.pretrained_checkpoint:
        info = read_info(cfg.pretrained_checkpoint)
    elif cfg.load:
        info = read_info(cfg.load)
    if info is None:
        if cfg.model is None:
            from megatron_dynamoe.utils.errors import ToolError

            raise ToolError("the checkpoint has no model.json (plain Megatron-Core): pass "
                            "--model PRESET to name its architecture")
        dyn = None if cfg.dense else DynaMoEConfig(num_shells=cfg.dynamoe_num_shells)
        info = CheckpointInfo(get_architecture(cfg.model), dyn, {})
    if info.dynamoe is not None:
        overrides = {k: v for k, v in dict(
            label_reference=cfg.dynamoe_label_reference,
            label_tolerance=cfg.dynamoe_label_tolerance,
            label_tolerance_max=cfg.dynamoe_label_tolerance_max,
            label_fraction=cfg.dynamoe_label_fraction,
            router_loss_coeff=cfg.dynamoe_router_loss_coeff).items() if v is not None}
        info = dataclasses.replace(info, dynamoe=dataclasses.replace(info.dynamoe, **overrides))
    return info


def batch_source(cfg, arch, dp_size: int):
    """BatchSource over Megatron GPT datasets built from --data-path with --tokenizer."""
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.data.datasets import build_gpt_datasets, default_cache_path
    from megatron_dynamoe.data.sampling import collate_samples
    from megatron_dynamoe.data.tokenizer import HFTokenizerAdapter
    from megatron_dynamoe.checkpoint.hf import load_tokenizer

    if not cfg.data_path:
        raise ToolError("no training data: pass --data-path PREFIX (tools/preprocess_data.py "
                        "writes PREFIX.bin / PREFIX.idx)")
    if cfg.tokenizer is None:
        raise ToolError("--data-path needs --tokenizer (the one the data was preprocessed "
                        "with: an HF folder, or 'smollm2')")
    tokenizer = HFTokenizerAdapter(load_tokenizer(cfg.tokenizer, cfg.gguf_file), cfg.tokenizer)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ToolError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                        f"vocabulary is {arch.vocab_size}: use the model's own tokenizer")
    # Index cache: next to the checkpoints, or in the user's own cache folder.
    cache = cfg.data_cache_path or default_cache_path(cfg.save)
    # Only Megatron's DotProductAttention reads a causal mask from the batch (it cannot make
    # one off CUDA); SDPA and TE attention are causal by the layer's mask type, and SDPA takes
    # its flash kernel only without a mask (Megatron-LM's --no-create-attention-mask-in-
    # dataloader).
    make_mask = cfg.transformer_impl == "local" and cfg.attention_backend == "local"
    datasets = build_gpt_datasets(cfg.data_path, tokenizer, seq_length=cfg.seq_length,
                                  num_samples=(cfg.train_iters * cfg.global_batch_size, 0, 0),
                                  cache_path=cache, split=cfg.split, seed=cfg.seed,
                                  create_attention_mask=make_mask)
    train_set = datasets.train
    if cfg.curriculum_scores:
        return curriculum_batch_source(cfg, train_set)

    def source(position: int, micro_batch_size: int):
        return collate_samples([train_set[i] for i in range(position,
                                                            position + micro_batch_size)])

    return source


def curriculum_batch_source(cfg, train_set):
    """BatchSource in the curriculum order of --curriculum-scores (a pure function of the
    sample position, so resumption stays exact)."""
    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.data.curriculum import CurriculumOrder, curriculum_source, load_scores

    scores = load_scores(cfg.curriculum_scores)
    profiled = scores.provenance.get("seq_length")
    if profiled is not None and profiled != cfg.seq_length:
        raise ToolError(f"{cfg.curriculum_scores} scores sequences of {profiled} tokens, this "
                        f"run trains {cfg.seq_length}: profile with the run's data flags")
    order = CurriculumOrder(scores, cfg.curriculum_window or cfg.global_batch_size,
                            cfg.curriculum_mode, seed=cfg.seed)
    order.check_covers(cfg.train_iters * cfg.global_batch_size, len(train_set))
    return curriculum_source(train_set.__getitem__, order)


def model_provider(info):
    """The provider of the model `info` describes: every family (dense, DynaMoE, top-k
    baseline, adaptive-gating MoE) trains through this entry point (`models.registry`)."""
    from megatron_dynamoe.models.registry import provider_for

    return provider_for(info)


def claim_save_folder(cfg):
    """Rank 0 claims --save for this run (`training.run_dir`); every rank learns the verdict
    through one all-reduce, so a refused folder ends all ranks with the same one-line error
    instead of leaving the others waiting at their first collective. Returns a context
    manager that holds the claim (the folder's lock) while the run lasts; a --save folder
    this run created is removed again when the run fails before its first checkpoint (a
    refused start leaves nothing behind)."""
    import contextlib
    import shutil

    import torch.distributed as dist

    from megatron_dynamoe.utils.errors import ToolError
    from megatron_dynamoe.runtime.device import any_rank
    from megatron_dynamoe.training.run_dir import claim_save_dir
    from megatron_dynamoe.checkpoint.save_folder import LATEST_FILE

    lock, error, created = None, None, False
    if cfg.save and dist.get_rank() == 0:
        created = not os.path.exists(cfg.save)
        lock, error = claim_save_dir(cfg.save, cfg.load, cfg.overwrite)
    if any_rank(error is not None):
        if lock is not None:
            lock.close()
        raise ToolError(error or f"rank 0 refused --save {cfg.save} (see its error line)")

    @contextlib.contextmanager
    def held():
        try:
            yield
        except BaseException:
            if created and not os.path.exists(os.path.join(cfg.save, LATEST_FILE)):
                shutil.rmtree(cfg.save, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                lock.close()

    return held()


def set_cuda_connection_limit(cfg, environ=None) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 with tensor parallelism on a GPU (Megatron-LM asserts it
    on Hopper and earlier): with one hardware queue, the sequence-parallel all-gather /
    reduce-scatter are scheduled before the GEMMs that overlap them. Must be set before the
    first CUDA call of the process; a different value the user exported is kept, with a
    warning."""
    from megatron_dynamoe.utils.log import log

    environ = os.environ if environ is None else environ
    if cfg.device == "cpu" or cfg.tensor_model_parallel_size == 1:
        return
    value = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if value is None:
        environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    elif value != "1":
        log(f"warning: CUDA_DEVICE_MAX_CONNECTIONS={value} with TP="
            f"{cfg.tensor_model_parallel_size}: Megatron's communication/GEMM overlap expects 1")


def _train(cfg, preempted, provider_for) -> int:
    from megatron_dynamoe.runtime import transformer_impl
    from megatron_dynamoe.runtime.parallel import destroy_parallel, initialize_parallel

    transformer_impl.select(cfg.transformer_impl)
    transformer_impl.select_attention(cfg.attention_backend)
    info = resolve_model(cfg)
    provider = provider_for(info)
    # Refuse a layout that does not fit the model before starting any process group.
    provider.transformer_config(cfg.layout, sequence_parallel=cfg.sequence_parallel)
    initialize_parallel(cfg.layout, seed=cfg.seed, device=cfg.device,
                        timeout_minutes=cfg.distributed_timeout_minutes)
    try:
        with claim_save_folder(cfg):  # one run per --save, for as long as this one lasts
            return _run(cfg, info, provider, preempted)
    finally:
        destroy_parallel()


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is a collective that outlived
    --distributed-timeout-minutes: NCCL raises DistBackendError, gloo a plain RuntimeError
    from its transport ("Timed out waiting ...ms for recv operation"). A store timeout
    (DistStoreError: rendezvous, start-up) is not one: it has its own message."""
    import torch.distributed as dist

    for _ in range(8):  # the chain of causes, bounded (a chain can be made circular)
        if error is None or isinstance(error, dist.DistStoreError):
            return False
        text = str(error)
        if isinstance(error, dist.DistBackendError) and any(
                word in text.lower() for word in ("timeout", "timed out", "timing out")):
            return True
        if isinstance(error, RuntimeError) and "gloo" in text and "Timed out waiting" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def collective_timeout_message(minutes: float, finished) -> str:
    """The one-line report of a collective timeout on this rank, after iteration `finished`
    (None: before this run's first iteration)."""
    rank = os.environ.get("RANK", "0")
    where = (f"after iteration {finished}" if finished is not None
             else "before this run's first iteration")
    return (f"rank {rank}: a collective did not complete within --distributed-timeout-minutes "
            f"{minutes:g} {where} (a rank stalled or died: check the other ranks' logs and "
            f"their node; raise --distributed-timeout-minutes if a step or a save "
            f"legitimately takes longer)")


def _run(cfg, info, provider, preempted) -> int:
    import collections

    from megatron.core import parallel_state

    from megatron_dynamoe.utils.errors import EXIT_COLLECTIVE_TIMEOUT, EXIT_DIVERGED
    from megatron_dynamoe.runtime.device import current
    from megatron_dynamoe.training.monitor import TrainingMonitor
    from megatron_dynamoe.training.trainer import TrainingDiverged, train

    cfg.num_microbatches(parallel_state.get_data_parallel_world_size())
    source = batch_source(cfg, info.architecture,
                          parallel_state.get_data_parallel_world_size())
    monitor = TrainingMonitor(cfg)
    kind = {"adaptive": "adaptive-gating MoE", "topk": "top-k baseline"}.get(
        provider.name, "DynaMoE" if info.dynamoe else "dense")
    monitor.text(f"training {kind} "
                 f"{info.architecture.family} model: TP={cfg.tensor_model_parallel_size} "
                 f"PP={cfg.pipeline_model_parallel_size} EP={cfg.expert_model_parallel_size} "
                 f"DP={parallel_state.get_data_parallel_world_size()} | "
                 f"{current().describe()} | transformer-impl {cfg.transformer_impl} | "
                 f"attention {cfg.attention_backend}")
    finished = collections.deque([None], maxlen=1)  # the last iteration this rank completed
    try:
        result = train(cfg, info, source, logger=monitor, provider=provider,
                       preemption_flag=preempted, on_iteration=finished.append)
    except TrainingDiverged as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except RuntimeError as e:
        if not is_collective_timeout(e):
            raise
        # Every surviving rank reports (rank 0 may be the one that stalled); no traceback:
        # the stack of the waiting rank says nothing about the rank that stopped.
        message = collective_timeout_message(cfg.distributed_timeout_minutes, finished[0])
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_COLLECTIVE_TIMEOUT
    finally:
        monitor.close()
    if result.stopped_by_signal and result.trained_iterations:
        monitor.text(f"stopped by a preemption signal after iteration {result.iteration}; "
                     f"resume with --load {cfg.save}")
    elif result.stopped_by_signal:
        monitor.text("stopped by a preemption signal before the first iteration: nothing "
                     "new to save; rerun the same command to continue")
    return 0
