"""The device policy (runtime.device) and what depends on it, proven without a GPU.

Placement is checked with the policy's target set to `meta`: every model that the trainer,
the distillation teacher, the evaluation loader and the tools build, and every batch they
feed it, must end on the target. A CPU target would prove nothing on a CPU machine (the
default device is the CPU already); a tensor left behind on the host shows up against `meta`.
Loading a checkpoint into meta tensors is impossible, so the load itself is stubbed there;
the real loads are covered by every other test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_dynamoe.runtime import device as runtime_device
from megatron_dynamoe.runtime.device import misplaced_tensors, placement_target
from tests.tool_runner import REPO, tool_main

META = torch.device("meta")


# ------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------
def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused_in_one_line():
    assert runtime_device.resolve("auto") == runtime_device.DevicePolicy(torch.device("cpu"),
                                                                         "gloo")
    with pytest.raises(ValueError, match="--device cuda but .*pass --device cpu"):
        runtime_device.resolve("cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    with pytest.raises(ValueError, match="choose one of auto, cuda, cpu"):
        runtime_device.resolve("tpu")


def test_cuda_device_is_local_rank_modulo_visible_gpus(monkeypatch):
    # Sites that bind one GPU per task show each rank a single device: cuda:LOCAL_RANK would
    # not exist there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    policy = runtime_device.resolve("cuda", env={"LOCAL_RANK": "6"})
    assert policy == runtime_device.DevicePolicy(torch.device("cuda", 2), "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime_device.resolve("auto", env={"LOCAL_RANK": "7"}).device == torch.device(
        "cuda", 0)
    # The CPU stays choosable on a GPU node.
    assert runtime_device.resolve("cpu", env={"LOCAL_RANK": "7"}).backend == "gloo"


@pytest.mark.usefixtures("single_rank")
def test_collective_tensors_live_on_the_group_backend_device(monkeypatch):
    assert runtime_device.comm_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert runtime_device.comm_device() == torch.device("cuda", 3)


@pytest.mark.usefixtures("single_rank")
def test_switching_device_inside_a_process_is_refused():
    with pytest.raises(ValueError, match="cannot switch"):
        runtime_device.activate(runtime_device.DevicePolicy(torch.device("cuda", 0), "nccl"))


# ------------------------------------------------------------------------------------------
# Placement against a meta target
# ------------------------------------------------------------------------------------------
def _tiny(dynamoe=True):
    from megatron_dynamoe.models.architectures import get_architecture
    from megatron_dynamoe.dynamoe.config import DynaMoEConfig

    return get_architecture("tiny-smollm2"), DynaMoEConfig(num_shells=4) if dynamoe else None


def _check_placed(module, what):
    left = misplaced_tensors(module, META)
    assert not left, f"{what}: not on the target device: {left[:5]}"


@pytest.mark.usefixtures("single_rank")
def test_built_model_is_wholly_on_the_target_rotary_frequencies_included():
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model

    arch, dyn = _tiny()
    model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
    assert misplaced_tensors(model, "cpu") == []
    # The walker sees plain tensor attributes, which Module.to() does not move.
    assert any(n.endswith("rotary_pos_emb.inv_freq")
               for n in misplaced_tensors(model, META))
    with placement_target(META):
        model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
    _check_placed(model, "build_gpt_model")
    assert model.rotary_pos_emb.inv_freq.device == META


@pytest.mark.usefixtures("single_rank")
def test_trainer_chunks_teacher_and_micro_batches_on_the_target(monkeypatch):
    from megatron_dynamoe.checkpoint import torch_dist as checkpointing
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo
    from megatron_dynamoe.models.builder import ModelProvider
    from megatron_dynamoe.training import trainer
    from megatron_dynamoe.training.config import TrainConfig

    arch, dyn = _tiny()
    cfg = TrainConfig(model="tiny-smollm2", micro_batch_size=2, global_batch_size=4,
                      seq_length=16, dynamoe_distill_teacher="teacher-folder",
                      virtual_pipeline_model_parallel_size=None)
    with placement_target(META):
        _, chunks = trainer.build_training_model(cfg, ModelProvider(arch, dyn))
        _check_placed(chunks, "trainer chunks")
        monkeypatch.setattr(checkpointing, "read_info", lambda path: CheckpointInfo(arch, None,
                                                                                    {}))
        monkeypatch.setattr(checkpointing, "load_checkpoint", lambda *a, **k: None)
        config = ModelProvider(arch, dyn).transformer_config(cfg.layout)
        teacher = trainer.build_teacher(cfg, CheckpointInfo(arch, dyn, {}), config)
        _check_placed(teacher.chunks, "distillation teacher")

        def source(position, size):  # what collate_samples returns, on the host
            tokens = torch.arange(size * 16).view(size, 16) + position
            return dict(tokens=tokens, labels=tokens + 1, loss_mask=torch.ones(size, 16),
                        position_ids=torch.arange(16).expand(size, 16),
                        attention_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool).triu(1))

        batch = next(trainer._MicroBatches(source, 0, 2, 2, 0, 1))
    assert batch and all(t.device == META for t in batch.values()), \
        {k: v.device for k, v in batch.items()}


class _Reached(Exception):
    """The first forward of a tool's model: placement checked, the tool stops here."""


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, single_rank):
    """(dense, DynaMoE) tiny-llama checkpoints written by the real tools' code paths."""
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import CheckpointInfo, save_checkpoint
    from megatron_dynamoe.dynamoe.moefy import moefy_state_dict
    from megatron_dynamoe.models.builder import build_gpt_model

    arch, dyn = _tiny()
    root = tmp_path_factory.mktemp("placement")
    torch.manual_seed(0)
    dense = build_gpt_model(arch, transformer_config(arch))
    save_checkpoint(dense, str(root / "dense"), CheckpointInfo(arch, None, {}))
    model = build_gpt_model(arch, transformer_config(arch, dynamoe=dyn), dyn)
    model.load_state_dict(moefy_state_dict(dense.state_dict(), dyn, gated=arch.gated))
    save_checkpoint(model, str(root / "dynamoe"), CheckpointInfo(arch, dyn, {}))
    return str(root / "dense"), str(root / "dynamoe")


TOOL_RUNS = {
    "moefy": ("tools/moefy.py", "--load {dense} --output {out} --dynamoe-num-shells 4 "
                                "--tokenizer smollm2 --calibration-sequences 2 "
                                "--calibration-seq-length 16 --no-dynamoe-fit-routers"),
    "export": ("tools/export.py", "--load {dynamoe} --output {out}"),
    "evaluate": ("tools/evaluate.py", "--load {dynamoe} --tokenizer smollm2 --output-dir {out} "
                                      "--tasks none --held-out-docs 2 --eval-sequences 1 "
                                      "--seq-length 16 --sensitivities 1"),
    "convert-megatron-to-hf": ("tools/convert_checkpoint.py",
                               "megatron-to-hf --load {dense} --output {out}"),
    "upcycle": ("tools/upcycle.py", "--load {dense} --output {out} --num-experts 2 "
                                    "--method split-importance"),
    "profile-curriculum": ("tools/profile_curriculum.py",
                           "--load {dynamoe} --output {out}.json --data-path {data} "
                           "--tokenizer smollm2 --seq-length 16 --train-iters 1 "
                           "--global-batch-size 2 --data-cache-path {out}-cache"),
}


@pytest.mark.parametrize("name", sorted(TOOL_RUNS))
def test_each_tool_builds_its_model_and_batches_on_the_target(name, tiny_checkpoints, tmp_path,
                                                              monkeypatch, request):
    from megatron.core.models.gpt import GPTModel

    from megatron_dynamoe.checkpoint import torch_dist as checkpointing
    from megatron_dynamoe.checkpoint import loading

    dense, dynamoe = tiny_checkpoints
    script, flags = TOOL_RUNS[name]
    data = request.getfixturevalue("sotu_prefix") if "{data}" in flags else None
    seen = {}

    def checked_forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        _check_placed(self, f"{name}'s model")
        for arg in (input_ids, position_ids, attention_mask):
            assert arg is None or arg.device == META, f"{name}: a batch tensor on {arg.device}"
        seen["forward"] = True
        raise _Reached

    monkeypatch.setattr(GPTModel, "forward", checked_forward)
    monkeypatch.setattr(checkpointing, "load_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: None)
    argv = flags.format(dense=dense, dynamoe=dynamoe, out=tmp_path / "out", data=data).split()
    with placement_target(META), pytest.raises(_Reached):
        tool_main(script)(argv + ["--device", "cpu"])
    assert seen


# ------------------------------------------------------------------------------------------
# Layer implementation: explicit, recorded, and Apex never changes the local model
# ------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("single_rank")
def test_transformer_engine_is_never_chosen_because_it_imports(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models import spec
    from megatron_dynamoe.runtime import transformer_impl

    arch, dyn = _tiny()
    monkeypatch.setattr(transformer_impl, "transformer_engine_available", lambda: True)
    calls = []
    monkeypatch.setattr(spec, "get_gpt_layer_with_transformer_engine_spec",
                        lambda *a, **k: calls.append(k) or (_ for _ in ()).throw(_Reached))
    config = transformer_config(arch, dynamoe=dyn)
    assert config.transformer_impl == "local"
    block = spec.decoder_block_spec(config, dyn)  # TE importable: still the local spec
    assert not calls and block.layer_specs
    # Asked for explicitly, the TE spec is what gets built.
    with pytest.raises(_Reached):
        spec.decoder_block_spec(transformer_config(arch, dynamoe=dyn,
                                                   transformer_impl="transformer_engine"), dyn)
    assert calls
    del gpt_layer_specs  # imported to make sure the module is loaded before patching


def test_transformer_engine_requested_but_absent_is_one_line():
    from megatron_dynamoe.runtime import transformer_impl

    if transformer_impl.transformer_engine_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine but Transformer "
                                         "Engine does not import here"):
        transformer_impl.check("transformer_engine")


@pytest.mark.usefixtures("single_rank")
def test_apex_fused_layer_norm_is_never_used_for_rmsnorm(monkeypatch):
    # With Apex installed Megatron sets LNImpl = FusedLayerNorm, which asserts LayerNorm-only:
    # every LLaMA model would crash at construction. No Apex is needed to reproduce it.
    from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_dynamoe.models.architectures import get_architecture, transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model

    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)
    arch, dyn = _tiny()
    for a, d in ((arch, dyn), (arch, None), (get_architecture("tiny-gpt2"), None)):
        model = build_gpt_model(a, transformer_config(a, dynamoe=d), d)
        norms = [type(m) for m in model.modules() if "Norm" in type(m).__name__]
        assert norms and FusedLayerNorm not in norms, norms
        assert set(norms) <= {torch.nn.RMSNorm, torch.nn.LayerNorm}, norms


def test_checkpoints_record_the_layer_implementation(tiny_checkpoints):
    for folder in tiny_checkpoints:
        with open(os.path.join(folder, "model.json")) as f:
            assert json.load(f)["extra"]["transformer_impl"] == "local"


# ------------------------------------------------------------------------------------------
# The trainer as a process: --device cpu beside CUDA variables, a signal during start-up
# ------------------------------------------------------------------------------------------
TRAIN = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--model", "tiny-smollm2",
         "--tokenizer", "smollm2", "--micro-batch-size", "1", "--global-batch-size", "2",
         "--seq-length", "32", "--log-interval", "1"]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
                **extra)


def test_device_cpu_trains_with_cuda_variables_present(tmp_path, sotu_prefix):
    # What a GPU node exports; --device cpu must not care (and must not touch a GPU).
    env = _env(CUDA_VISIBLE_DEVICES="0,1", NVIDIA_VISIBLE_DEVICES="all", LOCAL_RANK="1",
               CUDA_DEVICE_MAX_CONNECTIONS="1")
    done = subprocess.run(TRAIN + ["--data-path", sotu_prefix, "--train-iters", "2",
                                   "--device", "cpu", "--distributed-timeout-minutes", "2",
                                   "--data-cache-path", str(tmp_path / "cache")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device cpu, backend gloo" in done.stdout
    assert "iteration        2/       2" in done.stdout
    refused = subprocess.run(TRAIN + ["--data-path", sotu_prefix, "--device", "cuda"],
                             env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --device cuda but ")


def test_sigterm_during_start_up_exits_cleanly_without_a_checkpoint(tmp_path, sotu_prefix):
    save = tmp_path / "run"
    proc = subprocess.Popen(TRAIN + ["--data-path", sotu_prefix, "--train-iters", "50",
                                     "--save", str(save), "--save-interval", "1",
                                     "--data-cache-path", str(tmp_path / "cache")],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # The first progress line (`[HH:MM:SS] ...`, the launcher description) comes after the
    # handler is installed and long before the first iteration (process groups, data and
    # model are still to come); import-time warnings may precede it.
    first = ""
    while not first.startswith("["):
        first = proc.stderr.readline()
        assert first, "the trainer printed no progress line"
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (first + err)[-3000:]
    assert "before the first iteration" in out, out[-2000:]
    assert "lm loss:" not in out
    assert not save.exists() or not any(p.name.startswith(("iter_", "latest"))
                                        for p in save.iterdir()), list(save.iterdir())
    assert time.time() - started < 300


def test_te_moe_layers_file_their_pre_mlp_norm_under_the_local_key(monkeypatch):
    # Megatron's TE MoE layer spec keeps `pre_mlp_layernorm.*` where its local spec writes
    # `mlp.linear_fc1.layer_norm_*`: our spec maps the TE name onto the local one. (The TE
    # builder is replaced by the local one minus that mapping, which is what TE's spec has.)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_dynamoe.models import spec

    def te_like(**kwargs):
        layer = get_gpt_layer_local_spec(**kwargs)
        layer.submodules.sharded_state_dict_keys_map = {"mlp.0.weight":
                                                        "mlp.linear_fc1.layer_norm_weight"}
        return layer

    monkeypatch.setattr(spec, "get_gpt_layer_with_transformer_engine_spec", te_like)
    layer = spec.moe_layer_spec(4, lambda mlp: mlp, "RMSNorm", use_te=True)
    local = spec.moe_layer_spec(4, lambda mlp: mlp, "RMSNorm", use_te=False)
    assert layer.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."] == \
        local.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."]


@pytest.mark.usefixtures("single_rank")
def test_checkpoint_loads_across_layer_implementations(tiny_checkpoints):
    """local -> transformer_engine: same sharded keys, same logits. Runs where TE imports."""
    from megatron_dynamoe.runtime import transformer_impl

    if not transformer_impl.transformer_engine_available():
        pytest.skip("Transformer Engine is not installed here (the GPU image has it)")
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.checkpoint.torch_dist import load_checkpoint
    from megatron_dynamoe.utils.parity import megatron_logits
    from megatron_dynamoe.models.builder import build_gpt_model

    arch, dyn = _tiny()
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for folder, d in zip(tiny_checkpoints, (None, dyn)):
        logits = {}
        for impl in ("local", "transformer_engine"):
            model = build_gpt_model(arch, transformer_config(arch, dynamoe=d,
                                                             transformer_impl=impl), d)
            load_checkpoint(model, folder)
            logits[impl] = megatron_logits(model, tokens)
        error = (logits["local"] - logits["transformer_engine"]).abs().max()
        assert error <= 1e-4 * logits["local"].abs().max(), (folder, float(error))


def test_tensor_parallel_gpu_runs_get_one_cuda_connection():
    import types

    from megatron_dynamoe.training.run import set_cuda_connection_limit as set_limit

    def cfg(device, tp):
        return types.SimpleNamespace(device=device, tensor_model_parallel_size=tp)

    env = {}
    set_limit(cfg("auto", 2), env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    for args in (("auto", 1), ("cpu", 4)):
        env = {}
        set_limit(cfg(*args), env)
        assert env == {}
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}  # the user's own choice is kept (with a warning)
    set_limit(cfg("cuda", 8), env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}


def test_one_train_command_serves_the_first_start_and_every_requeue(tiny_checkpoints, tmp_path):
    # --load SAVE (empty at the first start) + --pretrained-checkpoint INIT: the model comes
    # from INIT until SAVE holds a training checkpoint (what SLURM requeues rely on).
    from megatron_dynamoe.training.config import TrainConfig
    from megatron_dynamoe.training.run import resolve_model

    dense, dynamoe = tiny_checkpoints
    for save in (tmp_path / "absent", tmp_path):
        info = resolve_model(TrainConfig(load=str(save), pretrained_checkpoint=dynamoe))
        assert info.dynamoe is not None and info.architecture == _tiny()[0]


@pytest.mark.usefixtures("single_rank")
def test_every_megatron_group_gets_the_distributed_timeout(monkeypatch):
    from megatron.core import parallel_state

    from megatron_dynamoe.runtime.parallel import ParallelLayout, initialize_parallel

    seen = {}
    real = parallel_state.initialize_model_parallel

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(parallel_state, "initialize_model_parallel", recording)
    initialize_parallel(ParallelLayout(), timeout_minutes=3)
    assert seen["distributed_timeout_minutes"] == 3
    with pytest.raises(ValueError, match="--distributed-timeout-minutes must be > 0"):
        initialize_parallel(ParallelLayout(), timeout_minutes=0)
    initialize_parallel(ParallelLayout())  # back to the default for later tests
