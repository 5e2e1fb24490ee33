"""Elastic resumption (#13 item 5): a training checkpoint resumes at another data-parallel size
with the loss curve of the uninterrupted run and, bit for bit, the optimizer state it saved;
the RNG state converts exactly to values `torch.load(weights_only=True)` reads; checkpoints
with the per-rank RNG key of older versions resume at their own world size and are refused
elsewhere in one line; a TP change is refused for the default 'dp_reshardable' optimizer
format and works for 'fully_reshardable'."""

import os
import random
import shutil
import types
import warnings

import numpy as np
import pytest
import torch

from megatron_dynamoe.checkpoint.torch_dist import CheckpointError
from megatron_dynamoe.checkpoint import save_folder
from megatron_dynamoe.training import state as training_state
from tests.multiproc import run_processes
from tests.test_training import INFO, _layout_worker, initial_weights  # noqa: F401 (fixture)

ITERS, SAVED_AT = 6, 3
TP2 = dict(tensor_model_parallel_size=2, sequence_parallel=True)


# ---------------------------------------------------------------------------------------------
# Worker-side patches (applied in the spawned ranks before training).
# ---------------------------------------------------------------------------------------------
def _old_rng_entry(kind):
    """The RNG entry as versions before elastic resumption wrote it: raw generator states
    (a NumPy array among them) keyed by world rank."""
    import torch.distributed as dist
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state(),
                 tracker=tensor_parallel.get_cuda_rng_tracker().get_states())
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),),
                         replica_id=0)


def _entries(node):
    """The per-parameter / padding entries of a dp_reshardable optimizer state dict."""
    if isinstance(node, dict) and "padding" in node:
        yield node
    elif isinstance(node, (dict, list)):
        for child in (node.values() if isinstance(node, dict) else node):
            yield from _entries(child)


def _parameter_ranges(model, optimizer) -> dict:
    """{checkpoint key: [(start, end)]} of this rank's slices of the dp_reshardable bucket
    tensors that hold parameters; the padding between them is never initialised."""
    state = optimizer.sharded_state_dict(model.sharded_state_dict(), metadata={
        "distrib_optim_sharding_type": "dp_reshardable"})
    ranges = {}
    for entry in _entries(state):
        if not entry["padding"].unwrap():
            for name in ("param", "exp_avg", "exp_avg_sq"):
                start = entry[name].global_offset[0]
                ranges.setdefault(entry[name].key, []).append(
                    (start, start + entry[name].local_shape[0]))
    return ranges


def _save_again_after_load(folder):
    """Make the trainer save the state it just loaded into `folder` (as this layout writes
    it) before training on, with this rank's parameter ranges (`_parameter_ranges`)."""
    import torch.distributed as dist

    load = training_state.load_training_state

    def load_and_save(path, model, optimizer, scheduler, **kwargs):
        iteration, consumed = load(path, model, optimizer, scheduler, **kwargs)
        training_state.save_training_state(folder, iteration, model, optimizer, scheduler,
                                           consumed, INFO)
        torch.save(_parameter_ranges(model, optimizer),
                   os.path.join(folder, f"ranges.rank{dist.get_rank()}.pt"))
        return iteration, consumed

    training_state.load_training_state = load_and_save


def _apply(patch):
    if patch == "old_format":
        training_state._rng_entry = _old_rng_entry
        training_state.current_layout = lambda: None  # older versions recorded no layout
    elif patch is not None and patch.startswith("save_again:"):
        _save_again_after_load(patch.split(":", 1)[1])


def _worker(rank, world_size, layout, out, weights, extra, patch):
    """test_training's _layout_worker (losses to OUT.rankR.pt) after `patch`; a
    CheckpointError (raised alike on every rank) goes to OUT.error instead."""
    _apply(patch)
    try:
        _layout_worker(rank, world_size, layout, out, weights, False, extra)
    except CheckpointError as e:
        if rank == 0:
            with open(out + ".error", "w") as f:
                f.write(str(e))


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------
def _train(out, world, weights, layout=None, patch=None, **extra):
    """Train ITERS iterations (from `weights`, or resumed) in `world` processes; returns the
    losses of rank 0, or the CheckpointError's text."""
    if extra.get("save"):
        os.makedirs(extra["save"], exist_ok=True)
    run_processes(_worker, world, layout or {}, str(out), weights,
                  {"train_iters": ITERS, **extra}, patch)
    if os.path.exists(f"{out}.error"):
        with open(f"{out}.error") as f:
            return f.read()
    return torch.load(f"{out}.rank0.pt")[0]


def _resume_folder(folder, save_dir) -> str:
    """A --save folder whose latest checkpoint is `save_dir`'s iteration SAVED_AT: the run
    that wrote it, as if it had stopped there."""
    name = os.path.basename(save_folder.iteration_folder(save_dir, SAVED_AT))
    shutil.copytree(os.path.join(save_dir, name), os.path.join(folder, name))
    with open(os.path.join(folder, save_folder.LATEST_FILE), "w") as f:
        f.write(f"{SAVED_AT}\n")
    return str(folder)


def _stored_tensors(folder) -> dict:
    """Every tensor of a torch_dist checkpoint (model and optimizer), read whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(folder).read_metadata().state_dict_metadata
    tensors = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
               for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "... assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=FileSystemReader(folder), no_dist=True)
    return tensors


def _held_elements(folder, world, tensors) -> dict:
    """{key: bool mask} of the elements of `tensors` (a checkpoint's) that hold data: all of
    a model weight, the parameter ranges the ranks of a `_save_again_after_load` run wrote to
    `folder` of an optimizer bucket (whose alignment padding is never initialised)."""
    ranges = {}
    for rank in range(world):
        for key, found in torch.load(os.path.join(folder, f"ranges.rank{rank}.pt")).items():
            ranges.setdefault(key, []).extend(found)
    held = {}
    for key, value in tensors.items():
        held[key] = torch.ones(value.shape, dtype=torch.bool)
        if key in ranges:
            held[key][:] = False
            for start, end in ranges[key]:
                held[key][start:end] = True
            assert held[key].float().mean() > 0.95, key  # a few alignment gaps only
    return held


def _leaves(node):
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, (list, tuple)):
        return [leaf for child in node for leaf in _leaves(child)]
    return [node]


def _assert_curve(found, reference):
    assert sorted(found) == list(range(SAVED_AT + 1, ITERS + 1)), found
    for it, value in found.items():
        assert abs(value - reference[it]) <= 1e-5 * abs(reference[it]), (it, value, reference)


def _uninterrupted(root, world, weights):
    save = str(root / "save")
    losses = _train(root / "run", world, weights, save=save, save_interval=SAVED_AT)
    return losses, save


@pytest.fixture(scope="module")
def dp1_run(tmp_path_factory, initial_weights):
    """(losses, --save folder with iterations 3 and 6) of an uninterrupted DP=1 run."""
    return _uninterrupted(tmp_path_factory.mktemp("dp1"), 1, initial_weights)


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory, initial_weights):
    """(losses, --save folder with iterations 3 and 6) of an uninterrupted DP=2 run."""
    return _uninterrupted(tmp_path_factory.mktemp("dp2"), 2, initial_weights)


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("single_rank")
def test_rng_state_converts_exactly_and_loads_weights_only(tmp_path):
    random.seed(11)
    random.gauss(0.0, 1.0)  # leaves a cached gaussian in the state
    np.random.seed(12)
    np.random.standard_normal()  # has_gauss = 1
    python, numpy = random.getstate(), np.random.get_state()
    assert python[2] is not None and numpy[3] == 1
    assert training_state.python_rng_from_plain(training_state.python_rng_to_plain(python)) \
        == python
    back = training_state.numpy_rng_from_plain(training_state.numpy_rng_to_plain(numpy))
    assert back[0] == numpy[0] and back[1].dtype == np.uint32
    assert np.array_equal(back[1], numpy[1]) and back[2:] == numpy[2:]

    state = training_state._rng_state()
    # Only what torch's own weights_only allowlist reads (megatron-core also allowlists NumPy
    # arrays, for Megatron-LM's RNG state, so a plain weights_only load would not tell).
    assert all(isinstance(v, (torch.Tensor, str, int, float, type(None)))
               for v in _leaves(state)), [type(v) for v in _leaves(state)]
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    expected = (random.random(), np.random.random(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    training_state._set_rng_state(loaded)
    assert (random.random(), np.random.random()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    # Checkpoints of older versions hold the raw states: they restore as well.
    training_state._set_rng_state({**loaded, "python": python, "numpy": numpy})
    assert random.getstate() == python
    assert np.array_equal(np.random.get_state()[1], numpy[1])


@pytest.mark.usefixtures("single_rank")
def test_rng_format_is_read_from_the_checkpoint_keys():
    """One process: an entry per model-parallel position is (0, 0) of (1, 1); the per-rank key
    of older versions loads at its own world size and is refused in one line elsewhere."""
    def metadata(*keys):
        return types.SimpleNamespace(state_dict_metadata=dict.fromkeys(keys))

    assert training_state._rng_shard() == ((0, 0), (1, 1), 0)
    kind = training_state._rng_kind
    assert kind("ck", metadata("rng_state/shard_0.0_1.1"), False) == "positions"
    assert kind("ck", metadata("rng_state/shard_0_1"), False) == "world"
    assert kind("ck", metadata("embedding.word_embeddings.weight"), False) is None
    with pytest.raises(CheckpointError) as e:
        kind("ck", metadata("rng_state/shard_0_2", "rng_state/shard_1_2"), False)
    assert str(e.value) == ("'ck' was written by an older version, which keyed its RNG state "
                            "by rank, at 2 ranks and resumes only there: launch 2 ranks, or "
                            "start from its weights with --pretrained-checkpoint ck")


@pytest.mark.multiproc
@pytest.mark.parametrize("saved_dp, resumed_dp", [(2, 1), (1, 2)])
def test_resume_at_another_data_parallel_size(saved_dp, resumed_dp, request, tmp_path,
                                              initial_weights):
    """Iterations 4..6 resumed at the other DP size follow the uninterrupted run's curve, the
    optimizer state (Adam exp_avg / exp_avg_sq, fp32 main parameters) is loaded exactly as it
    was saved, and at iteration 6 it agrees with the uninterrupted run's."""
    losses, save = request.getfixturevalue(f"dp{saved_dp}_run")
    resume = _resume_folder(tmp_path / "resume", save)
    again = str(tmp_path / "again")
    rest = _train(tmp_path / "rest", resumed_dp, initial_weights, load=resume, save=resume,
                  patch=f"save_again:{again}")
    _assert_curve(rest, losses)

    step = os.path.basename(save_folder.iteration_folder(save, SAVED_AT))
    written, loaded = (_stored_tensors(os.path.join(d, step)) for d in (save, again))
    held = _held_elements(again, resumed_dp, written)
    assert written.keys() == loaded.keys() and any(k.endswith(".exp_avg_sq") for k in held)
    for key, value in written.items():
        assert torch.equal(loaded[key][held[key]], value[held[key]]), key

    final = os.path.basename(save_folder.iteration_folder(save, ITERS))
    reference, resumed = (_stored_tensors(os.path.join(d, final)) for d in (save, resume))
    for key, value in reference.items():
        value, found = value[held[key]], resumed[key][held[key]]
        assert (found - value).abs().max() <= 1e-4 * value.abs().max(), key


@pytest.mark.multiproc
def test_per_rank_rng_checkpoint_resumes_at_its_world_size_only(tmp_path, dp2_run,
                                                                initial_weights):
    losses, _ = dp2_run
    save = str(tmp_path / "old")
    _train(tmp_path / "first", 2, initial_weights, save=save, exit_after_iters=SAVED_AT,
           patch="old_format")
    folder = save_folder.iteration_folder(save, SAVED_AT)
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(folder).read_metadata().state_dict_metadata
    assert {"rng_state/shard_0_2", "rng_state/shard_1_2"} <= set(keys)
    error = _train(tmp_path / "dp1", 1, initial_weights, load=save, save=save)
    assert error == (f"{folder!r} was written by an older version, which keyed its RNG state "
                     f"by rank, at 2 ranks and resumes only there: launch 2 ranks, or start "
                     f"from its weights with --pretrained-checkpoint {folder}")
    rest = _train(tmp_path / "rest", 2, initial_weights, load=save, save=save)
    assert rest == {it: losses[it] for it in range(SAVED_AT + 1, ITERS + 1)}  # same layout


@pytest.mark.multiproc
def test_other_tensor_parallel_size_is_refused_for_dp_reshardable(tmp_path, dp2_run,
                                                                  initial_weights):
    _, save = dp2_run
    resume = _resume_folder(tmp_path / "resume", save)
    folder = save_folder.iteration_folder(resume, SAVED_AT)
    error = _train(tmp_path / "tp2", 2, initial_weights, layout=TP2, load=resume, save=resume)
    assert error == (f"{folder!r} was written at TP=1 PP=1; resuming at TP=2 is not supported "
                     f"(its optimizer state is saved dp_reshardable): resume at TP=1 PP=1, or "
                     f"start from its weights with --pretrained-checkpoint {folder}")


@pytest.mark.multiproc
def test_fully_reshardable_checkpoint_resumes_at_another_tensor_parallel_size(
        tmp_path, dp2_run, initial_weights):
    """Saved at TP=1 x DP=2 with the optimizer 'fully_reshardable', resumed at TP=2: the
    curve continues (the RNG state is dropped for the seeded one, as in Megatron-LM)."""
    losses, _ = dp2_run
    save = str(tmp_path / "full")
    _train(tmp_path / "first", 2, initial_weights, save=save, exit_after_iters=SAVED_AT,
           dist_ckpt_optim_fully_reshardable=True)
    rest = _train(tmp_path / "rest", 2, initial_weights, layout=TP2, load=save, save=save)
    _assert_curve(rest, losses)
