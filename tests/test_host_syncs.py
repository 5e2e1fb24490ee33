"""Host-sync budget of the routing layers and the monitor (GPU-AUDIT #6, #24, §5 item 8).

On a GPU every device-to-host read (`.item()`, `.tolist()`, `bool(t)`, `float(t)`,
`torch.bincount`'s min/max, boolean-mask indexing, `.cpu()`) stalls the host until the
device catches up. The DynaMoE and adaptive-gating layers must do none in forward or
backward; the training monitor must read the layers' statistics only when it writes them,
with one batched copy. This CPU test counts the calls of those entry points whose caller is
megatron_dynamoe code (Megatron-Core's own syncs, e.g. the alltoall dispatcher's split
sizes, are not ours and are not counted), and checks the statistics against host references.
"""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import megatron_dynamoe
from megatron_dynamoe.dynamoe import routing as R
from megatron_dynamoe.dynamoe.config import DynaMoEConfig
from megatron_dynamoe.dynamoe.layer import read_stat_sums
from megatron_dynamoe.models.builder import causal_attention_mask
from megatron_dynamoe.dynamoe.control import (dynamoe_layers, set_level_sorted_experts,
                                              set_sensitivity, set_training_step)
from megatron_dynamoe.runtime.parallel import ParallelLayout
from tests.builders import ARCH, batch, build_dense, build_dynamoe, moefied_state

pytestmark = pytest.mark.usefixtures("single_rank")

PACKAGE = os.path.dirname(os.path.abspath(megatron_dynamoe.__file__)) + os.sep
TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
# CPU stand-ins for Megatron's own calls (never used on a GPU): their caller decides.
TRANSPARENT = (os.path.join(PACKAGE, "runtime", "cpu_compat.py"),)
THIS = os.path.abspath(__file__)

# Tensor methods / torch functions that read device memory on the host (or, for
# torch.tensor, copy host data to the device) when the tensors live on a GPU.
TENSOR_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
                  "cpu", "nonzero", "masked_select", "unique")
TORCH_FUNCTIONS = ("bincount", "nonzero", "masked_select", "unique", "equal", "allclose",
                   "is_nonzero", "tensor")


def _our_caller():
    """File:line of the code that called the patched entry point when it is
    megatron_dynamoe's, else None. Torch's own Python frames and the CPU stand-ins are
    skipped: the first other frame is the caller."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name == THIS or name.startswith(TORCH) or name in TRANSPARENT:
            frame = frame.f_back
            continue
        return f"{name[len(PACKAGE):]}:{frame.f_lineno}" if name.startswith(PACKAGE) else None
    return None


def _storage(t):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:   # noqa: BLE001 - tensors without storage (meta, sparse) are not ours
        return None


class SyncRecorder:
    """Patches the entry points; records calls from megatron_dynamoe while `active`.

    `.cpu()` returns a copy with its own storage (as a device-to-host copy would) and the
    storages of those copies are remembered: reading them later is host work, not a sync.
    """

    def __init__(self, monkeypatch):
        self.active = False
        self._inside = False     # inside a patched entry point (nested calls are its own)
        self.calls = []          # (entry point, caller) of device reads by our code
        self.copies = []         # callers of .cpu()
        self.host = set()        # storages of tensors .cpu() returned
        for name in TENSOR_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._method(name, getattr(torch.Tensor,
                                                                                  name)))
        for name in TORCH_FUNCTIONS:
            monkeypatch.setattr(torch, name, self._function(name, getattr(torch, name)))
        # Boolean-mask indexing is seen through a TorchFunctionMode while active: assigning
        # torch.Tensor.__getitem__ (even if undone) leaves CPython's sequence slot on the
        # class, after which torch.tensor() of 0-d tensors fails for the rest of the process.
        recorder = self

        class _MaskIndexing(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.Tensor.__getitem__ and recorder.active:
                    index = args[1]
                    parts = index if isinstance(index, tuple) else (index,)
                    if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool
                           and p.dim() > 0 for p in parts):
                        recorder._note("boolean-mask indexing", args[0])
                return func(*args, **(kwargs or {}))

        self._mask_indexing = _MaskIndexing()

    def _note(self, name, tensor=None):
        caller = _our_caller()
        if caller is None:
            return
        if tensor is not None and _storage(tensor) in self.host:
            return
        self.calls.append((name, caller))

    def _method(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            if not self.active or self._inside:
                return original(tensor, *args, **kwargs)
            self._inside = True  # the mask-indexing mode re-enters this wrapper: count once
            try:
                if name == "cpu":
                    caller = _our_caller()
                    if caller is not None:
                        self.copies.append(caller)
                        out = original(tensor, *args, **kwargs).clone()
                        self.host.add(_storage(out))
                        return out
                    return original(tensor, *args, **kwargs)
                self._note(f"Tensor.{name}", tensor)
                return original(tensor, *args, **kwargs)
            finally:
                self._inside = False
        return wrapper

    def _function(self, name, original):
        def wrapper(*args, **kwargs):
            if not self.active or self._inside:
                return original(*args, **kwargs)
            self._inside = True
            try:
                self._note(f"torch.{name}",
                           args[0] if args and isinstance(args[0], torch.Tensor) else None)
                return original(*args, **kwargs)
            finally:
                self._inside = False
        return wrapper

    def __enter__(self):
        self.calls, self.copies, self.host = [], [], set()
        self.active = True
        self._mask_indexing.__enter__()
        return self

    def __exit__(self, *exc):
        self._mask_indexing.__exit__(*exc)
        self.active = False


def test_recorder_sees_syncs_from_our_code_only(monkeypatch):
    from megatron_dynamoe.evaluation import budget

    recorder = SyncRecorder(monkeypatch)
    q = torch.rand(8, 4).cumsum(dim=-1)
    with recorder:
        budget.fraction_at(q / q[:, -1:], torch.tensor([0.25, 0.5, 0.75, 1.0]), 0.5)  # float()
        torch.bincount(torch.tensor([1, 2]))    # the test's own call: not ours
    assert [name for name, _ in recorder.calls] == ["Tensor.__float__"]
    assert recorder.calls[0][1].startswith("evaluation/budget.py:")


# ---- DynaMoE --------------------------------------------------------------------------------
def _dynamoe_model(label_fraction, dispatcher="alltoall"):
    """Tiny DynaMoE GPT (8 shells, 4 levels, hard labels), random routers, theta 0.6."""
    dyn = DynaMoEConfig(num_shells=8, label_fraction=label_fraction, label_tolerance=0.3,
                        label_tolerance_max=None)
    dense = build_dense(seed=5)
    model = build_dynamoe(dyn, dispatcher=dispatcher)
    model.load_state_dict(moefied_state(dense, dyn, router_seed=5))
    set_sensitivity(model, 0.6)
    model.train()
    return model


def _capture_inputs(layers):
    """Forward pre-hooks keeping each layer's input of every forward."""
    seen = {id(layer): [] for layer in layers}
    handles = [layer.register_forward_pre_hook(
        lambda mod, args: seen[id(mod)].append(args[0].detach().clone())) for layer in layers]
    return seen, handles


def _train_micro_batches(model, micro_batches, step):
    set_training_step(model, step)
    for data in micro_batches:
        logits = model(data["tokens"], data["position_ids"], data["attention_mask"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               data["labels"].reshape(-1))
        loss.backward()


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("label_fraction, level_sorted", [(1.0, True), (0.0, False),
                                                          (0.0, True)],
                         ids=["labelled", "routed-dispatcher", "routed-level-sorted"])
def test_dynamoe_forward_backward_has_no_host_syncs(monkeypatch, label_fraction, level_sorted,
                                                     dispatcher):
    model = _dynamoe_model(label_fraction, dispatcher)
    set_level_sorted_experts(model, level_sorted)
    layers = dynamoe_layers(model)
    dyn = layers[0].dynamoe_config
    micro_batches = [batch(batch_size=2, seq_len=16, seed=s) for s in range(3)]
    seen, handles = _capture_inputs(layers)
    labels_seen = {id(layer): [] for layer in layers}
    label_handles = [layer.register_forward_hook(
        lambda mod, args, out: labels_seen[id(mod)].append(
            (mod.last_stats.get("labels"), mod.last_stats.get("router_loss"))))
        for layer in layers]
    recorder = SyncRecorder(monkeypatch)
    with recorder:
        _train_micro_batches(model, micro_batches, step=0)
    for h in handles + label_handles:
        h.remove()
    if label_fraction == 0.0 and level_sorted:
        # The level-sorted experts read their prefix lengths once per layer forward: the
        # split sizes Megatron's SequentialMLP reads on the dispatcher path (not counted
        # there: Megatron's own), read by our layer instead. Nothing else.
        assert all(layer.uses_level_sorted_experts() for layer in layers)
        assert [name for name, _ in recorder.calls] == ["Tensor.tolist"] * (3 * len(layers))
        assert {caller.split(":")[0] for _, caller in recorder.calls} == {"dynamoe/layer.py"}
    else:
        assert recorder.calls == [], recorder.calls
    assert recorder.copies == []

    # The device sums equal host references over the three micro-batches.
    K = dyn.num_levels
    sums = read_stat_sums(layers)
    for layer, window in zip(layers, sums):
        with torch.no_grad():
            levels = torch.cat([layer.router.decide(x).levels for x in seen[id(layer)]])
        expected = torch.bincount(levels - 1, minlength=K)
        assert window["level_counts"] == expected.double().tolist()
        assert window["forwards"] == 3
        summary = layer.summarize_stats(window)
        fractions = torch.tensor(dyn.level_shells, dtype=torch.float64)[levels - 1] / 8
        assert summary["ffn_fraction"] == pytest.approx(float(fractions.mean()), rel=1e-12)
        routing_map = R.level_routing_map(levels, layer.router.level_masks)
        assert summary["tokens_per_expert"] == routing_map.sum(dim=0).double().tolist()
        assert summary["tokens"] == levels.numel()
        assert len(levels.unique()) > 1   # the case really spreads tokens over levels
        if label_fraction == 1.0:
            labels = torch.cat([lab for lab, _ in labels_seen[id(layer)]])
            assert window["labelled_forwards"] == 3
            assert window["label_counts"] == torch.bincount(
                labels - 1, minlength=K).double().tolist()
            # Hard labels: the router loss is the cross-entropy of the level logits on them.
            with torch.no_grad():
                logits = torch.cat([layer.router.level_logits(x) for x in seen[id(layer)]])
            ce = F.cross_entropy(logits.double(), labels - 1, reduction="sum")
            assert summary["router_loss"] == pytest.approx(float(ce) / labels.numel(),
                                                           rel=1e-5)
            predicted = R.median_levels(torch.softmax(logits, dim=-1))
            assert summary["router_accuracy"] == pytest.approx(
                float((predicted == labels).double().mean()), rel=1e-12)
        else:
            assert window["labelled_forwards"] == 0 and summary["router_loss"] is None
        # Per-forward statistics stay available (and agree with the last micro-batch).
        last = layer.last_stats["level_counts"]
        assert torch.equal(last, torch.bincount(
            layer.router.decide(seen[id(layer)][-1]).levels - 1, minlength=K))


def test_full_recompute_counts_each_micro_batch_once():
    from megatron_dynamoe.models.architectures import transformer_config
    from megatron_dynamoe.models.builder import build_gpt_model

    dyn = DynaMoEConfig(num_shells=8, label_fraction=1.0, label_tolerance=0.3,
                        label_tolerance_max=None)
    config = transformer_config(ARCH, ParallelLayout(), dyn, recompute_granularity="full",
                                recompute_method="uniform", recompute_num_layers=1)
    model = build_gpt_model(ARCH, config, dyn)
    model.load_state_dict(moefied_state(build_dense(seed=5), dyn, router_seed=5))
    set_sensitivity(model, 0.6)
    model.train()
    micro_batches = [batch(batch_size=2, seq_len=16, seed=s) for s in range(2)]
    _train_micro_batches(model, micro_batches, step=0)
    for window in read_stat_sums(dynamoe_layers(model)):
        # The no-grad first pass is not counted; the recomputation (with labels) is.
        assert window["forwards"] == 2 and window["labelled_forwards"] == 2
        assert sum(window["level_counts"]) == sum(window["label_counts"]) == 2 * 32


def test_recompute_first_pass_and_reset_do_not_count():
    model = _dynamoe_model(label_fraction=0.0)
    layer = dynamoe_layers(model)[0]
    data = batch(batch_size=2, seq_len=16, seed=1)
    with torch.no_grad():   # a training-mode forward without autograd: recompute's first pass
        model(data["tokens"], data["position_ids"], data["attention_mask"])
    assert read_stat_sums([layer])[0]["forwards"] == 0
    assert layer.last_stats["tokens"] == 32   # per-forward statistics are still kept
    _train_micro_batches(model, [data], step=0)
    assert sum(read_stat_sums([layer])[0]["level_counts"]) == 32
    layer.reset_stats()
    window = read_stat_sums([layer])[0]
    assert window["forwards"] == 0 and sum(window["level_counts"]) == 0
    model.eval()            # evaluation forwards count
    with torch.no_grad():
        model(data["tokens"], data["position_ids"], data["attention_mask"])
    assert read_stat_sums([layer])[0]["forwards"] == 1


def test_level_counts_match_bincount():
    gen = torch.Generator().manual_seed(0)
    levels = torch.randint(1, 6, (1000,), generator=gen)
    assert torch.equal(R.level_counts(levels, 5), torch.bincount(levels - 1, minlength=5))
    assert torch.equal(R.level_counts(torch.ones(0, dtype=torch.long), 3),
                       torch.zeros(3, dtype=torch.long))


def test_curriculum_scores_of_dynamoe_layers_use_one_copy(monkeypatch):
    from megatron_dynamoe.data.curriculum import sequence_scores

    model = _dynamoe_model(label_fraction=0.0)
    model.eval()
    layers = dynamoe_layers(model)
    seen, handles = _capture_inputs(layers)
    data = batch(batch_size=1, seq_len=16, seed=4)
    with torch.no_grad():
        model(data["tokens"], data["position_ids"], data["attention_mask"])
    for h in handles:
        h.remove()
    recorder = SyncRecorder(monkeypatch)
    with recorder:
        scores = sequence_scores(model)
    assert len(recorder.copies) == 1 and recorder.calls == []
    means = [float(layer.router.decide(seen[id(layer)][0]).levels.double().mean())
             for layer in layers]
    assert scores.tolist() == pytest.approx([sum(means) / len(means)], rel=1e-12)


# ---- adaptive gating ------------------------------------------------------------------------
def _adaptive_model(**gating_kw):
    from megatron_dynamoe.adaptive.config import AdaptiveGatingConfig
    from megatron_dynamoe.adaptive.provider import AdaptiveMoEProvider, adaptive_layers

    gating = AdaptiveGatingConfig(num_experts=4, threshold=0.2, **gating_kw)
    provider = AdaptiveMoEProvider(ARCH, gating)
    torch.manual_seed(0)
    model = provider.build(provider.transformer_config(ParallelLayout()))
    for layer in adaptive_layers(model):
        with torch.no_grad():
            layer.router.weight.mul_(15.0)
    return model, adaptive_layers(model)


@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=["dropless", "capacity"])
def test_adaptive_forward_backward_has_no_host_syncs(monkeypatch, capacity_factor):
    from megatron_dynamoe.adaptive.router import AdaptiveRouter, window_scalars

    model, layers = _adaptive_model(capacity_factor=capacity_factor)
    model.train()
    per_forward = {id(layer.router): [] for layer in layers}
    handles = [layer.router.register_forward_hook(
        lambda mod, args, out: per_forward[id(mod)].append(
            ({k: v.clone() for k, v in mod.last_stats.items()}, out[1].clone())))
        for layer in layers]
    recorder = SyncRecorder(monkeypatch)
    tokens = torch.randint(0, ARCH.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with recorder:
        for _ in range(2):
            logits = model(tokens, torch.arange(32).expand(2, 32), causal_attention_mask(32))
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                            tokens.reshape(-1)).backward()
    for h in handles:
        h.remove()
    assert recorder.calls == [], recorder.calls
    assert recorder.copies == []

    windows = read_stat_sums([layer.router for layer in layers])
    for layer, window in zip(layers, windows):
        forwards = per_forward[id(layer.router)]
        assert window["forwards"] == 2
        summary = AdaptiveRouter.summarize_stats(window)
        kept = sum(routing_map.sum(dim=0) for _, routing_map in forwards)
        assert summary["tokens_per_expert"] == kept.double().tolist()
        assert summary["tokens"] == 2 * 64
        assert summary["dropped_assignments"] == sum(
            float(stats["dropped_assignments"]) for stats, _ in forwards)
        assert summary["two_expert_share"] == pytest.approx(
            sum(float(stats["two_expert_share"]) for stats, _ in forwards) / 2, rel=1e-12)
        assert summary["mean_experts_per_token"] == pytest.approx(
            sum(float(stats["mean_experts_per_token"]) for stats, _ in forwards) / 2,
            rel=1e-12)
        if capacity_factor is not None:
            assert summary["dropped_assignments"] > 0

    # After one forward the window's scalars are the last forward's, computed on the host from
    # `last_stats` (what the provider reported before the window existed).
    def routing_scalars(model):
        out, dropped, fully_dropped = {}, 0.0, 0.0
        for layer in layers:
            stats = layer.router.last_stats
            tag = f"moe/layer{layer.layer_number:03d}"
            out[f"{tag}/two-expert-share"] = float(stats["two_expert_share"])
            out[f"{tag}/experts-per-token"] = float(stats["mean_experts_per_token"])
            load = stats["tokens_per_expert"].double()
            for expert, count in enumerate(load.tolist()):
                out[f"{tag}/expert{expert}-tokens"] = count
            if load.sum() > 0:
                out[f"{tag}/expert-load-imbalance"] = float(load.max() / load.mean())
            dropped += float(stats["dropped_assignments"])
            fully_dropped += float(stats["dropped_tokens"])
        out["moe/dropped-tokens"], out["moe/fully-dropped-tokens"] = dropped, fully_dropped
        return out

    for layer in layers:
        layer.router.reset_stats()
    model.eval()
    with torch.no_grad():
        model(tokens, torch.arange(32).expand(2, 32), causal_attention_mask(32))
    with recorder:
        ours = window_scalars(layers)
    assert len(recorder.copies) == 1 and recorder.calls == []
    reference = routing_scalars(model)
    assert ours.keys() == reference.keys()
    for tag, value in reference.items():
        assert ours[tag] == pytest.approx(value, rel=1e-6), tag


# ---- monitor --------------------------------------------------------------------------------
def _monitor_config(tmp_path, tensorboard: bool):
    from megatron_dynamoe.training.config import TrainConfig

    return TrainConfig(model="tiny-llama", micro_batch_size=2, global_batch_size=4, seq_length=16, train_iters=10,
                       log_interval=5,
                       tensorboard_dir=str(tmp_path / "tb") if tensorboard else None)


def _log(monitor, cfg, model, iteration):
    monitor.iteration(iteration, cfg, loss=2.5, theta=0.6, grad_norm=1.0, lr=1e-3, seconds=0.1,
                      model=[model])


def test_monitor_reads_stats_once_per_logging_call(monkeypatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dynamoe.training.monitor import TrainingMonitor

    model = _dynamoe_model(label_fraction=1.0)
    layers = dynamoe_layers(model)
    micro_batches = [batch(batch_size=2, seq_len=16, seed=s) for s in range(2)]
    recorder = SyncRecorder(monkeypatch)

    # Without TensorBoard, off the log interval: no device read at all, and a new window.
    cfg = _monitor_config(tmp_path, tensorboard=False)
    out = io.StringIO()
    monitor = TrainingMonitor(cfg, stream=out)
    _train_micro_batches(model, micro_batches, step=0)
    with recorder:
        _log(monitor, cfg, model, 3)
    assert recorder.copies == [] and recorder.calls == []
    assert all(layer.stat_sums.counters["forwards"] == 0 for layer in layers)
    assert all(not layer.stat_sums.sums.any() for layer in layers)

    # A log iteration without TensorBoard: one copy, the printed FFN compute from it.
    seen, handles = _capture_inputs(layers)
    _train_micro_batches(model, micro_batches, step=1)
    for h in handles:
        h.remove()
    with recorder:
        _log(monitor, cfg, model, 5)
    assert len(recorder.copies) == 1 and recorder.calls == [], (recorder.copies,
                                                                recorder.calls)
    fractions = []
    for layer in layers:
        levels = torch.cat([layer.router.decide(x).levels for x in seen[id(layer)]])
        shells = torch.tensor(layer.dynamoe_config.level_shells, dtype=torch.float64)
        fractions.append(float((shells[levels - 1] / layer.dynamoe_config.num_shells).mean()))
    line = out.getvalue().strip().splitlines()[-1]
    assert f"FFN compute: {sum(fractions) / len(fractions):.3f}" in line

    # With TensorBoard: one copy per iteration; the events come from it.
    cfg = _monitor_config(tmp_path, tensorboard=True)
    monitor = TrainingMonitor(cfg, stream=io.StringIO())
    seen, handles = _capture_inputs(layers)
    _train_micro_batches(model, micro_batches, step=0)   # a label step
    for h in handles:
        h.remove()
    with recorder:
        _log(monitor, cfg, model, 7)
    assert len(recorder.copies) == 1 and recorder.calls == [], (recorder.copies,
                                                                recorder.calls)
    monitor.close()
    acc = EventAccumulator(cfg.tensorboard_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    K = layers[0].dynamoe_config.num_levels
    for layer in layers:
        tag = f"dynamoe/layer{layer.layer_number:03d}"
        levels = torch.cat([layer.router.decide(x).levels for x in seen[id(layer)]])
        counts = torch.bincount(levels - 1, minlength=K).double()
        histogram = acc.Histograms(f"{tag}/levels")[0].histogram_value
        assert list(histogram.bucket) == counts.tolist()
        assert histogram.num == levels.numel()
        assert histogram.sum == float((levels.double()).sum())
        assert histogram.min == float(levels.min()) and histogram.max == float(levels.max())
        shells = torch.tensor(layer.dynamoe_config.level_shells, dtype=torch.float64)
        fraction = float((shells[levels - 1] / layer.dynamoe_config.num_shells).mean())
        assert acc.Scalars(f"{tag}/ffn-compute-fraction")[0].value == pytest.approx(fraction)
        assert acc.Scalars(f"{tag}/ep-rank0-tokens")[0].value == float(
            R.level_routing_map(levels, layer.router.level_masks).sum())
        assert acc.Scalars(f"{tag}/router-accuracy")[0].step == 7
        assert 0.0 < acc.Scalars(f"{tag}/router-loss")[0].value
