"""No tensor created without a device in a hot path (a static check; the placement tests in
test_device_policy.py check what the code does, this checks what it is allowed to write).

In the modules that run per step or per batch, every `torch.<factory>(...)` must name its
`device=` (or be a `*_like` / `new_*` form, which inherit one). A factory without a device
allocates on the host: on a GPU run that is a host tensor meeting device tensors (an error)
or a blocking host-to-device copy per call. The exceptions are listed below with the reason
each is on the host on purpose; a new one must be added here, reason included.
"""

from __future__ import annotations

import ast
import os

import pytest

from tests.tool_runner import REPO

FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace",
             "eye", "rand", "randn", "randint", "randperm"}

HOT_PATH = [
    "megatron_dynamoe/dynamoe/layer.py",
    "megatron_dynamoe/dynamoe/router.py",
    "megatron_dynamoe/dynamoe/routing.py",
    "megatron_dynamoe/dynamoe/experts.py",
    "megatron_dynamoe/adaptive/router.py",
    "megatron_dynamoe/baselines/topk.py",
    "megatron_dynamoe/training/trainer.py",
    "megatron_dynamoe/training/preemption.py",
    "megatron_dynamoe/training/monitor.py",
    "megatron_dynamoe/training/distillation.py",
    "megatron_dynamoe/training/state.py",
    "megatron_dynamoe/evaluation/perplexity.py",
    "megatron_dynamoe/evaluation/scoring.py",
    "megatron_dynamoe/evaluation/recorder.py",
    "megatron_dynamoe/evaluation/budget.py",
    "megatron_dynamoe/cli/common.py",
    "megatron_dynamoe/models/norms.py",
]

# (module, function) -> why a device-less factory is right there.
ALLOWED = {
    # Module construction: build_gpt_model places every parameter, buffer and tensor attribute
    # on the policy's device right after (runtime.device.place_model).
    ("megatron_dynamoe/dynamoe/layer.py", "__init__"): "construction, placed after",
    ("megatron_dynamoe/dynamoe/router.py", "__init__"): "construction, placed after",
    ("megatron_dynamoe/baselines/topk.py", "__init__"): "construction, placed after",
    ("megatron_dynamoe/evaluation/recorder.py", "__init__"): "host accumulators (float64)",
    # Called only by DifficultyRouter.__init__ to build its mask buffers.
    ("megatron_dynamoe/dynamoe/routing.py", "logical_level_masks"): "construction only",
    ("megatron_dynamoe/dynamoe/routing.py", "logical_group_masks"): "construction only",
    # Host-side draws from host generators, read back as Python numbers (no device involved).
    ("megatron_dynamoe/training/trainer.py", "sample_sensitivity"): "host generator",
    ("megatron_dynamoe/baselines/topk.py", "routing"): "host generator picks k",
    # torch Adam keeps its 'step' counters on the CPU (non-capturable Adam).
    ("megatron_dynamoe/training/state.py", "_materialise_optimizer_state"): "Adam step",
    ("megatron_dynamoe/training/state.py", "_restore_adam_steps"): "Adam step",
    # A state dict assembled on the host and copied into the model by load_state_dict.
    ("megatron_dynamoe/baselines/topk.py", "topk_state_from_dynamoe"): "state dict",
    # Batches built on the host, then moved once by runtime.device.place_batch.
    ("megatron_dynamoe/evaluation/scoring.py", "score_requests"): "host batch, placed",
    # Host copies of the layer statistics, after the one device-to-host copy.
    ("megatron_dynamoe/evaluation/recorder.py", "commit"): "host statistics",
}


def _device_less_factories(path):
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read(), path)
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            found.append((function, node.lineno, node.func.attr))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


@pytest.mark.parametrize("path", HOT_PATH)
def test_hot_path_tensors_name_their_device(path):
    offenders = [f"{path}:{line}: torch.{name}(...) in {function}() has no device="
                 for function, line, name in _device_less_factories(path)
                 if (path, function) not in ALLOWED]
    assert not offenders, "\n".join(offenders)


def test_the_lint_sees_a_device_less_factory(tmp_path, monkeypatch):
    import tests.test_device_lint as lint

    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef step(x):\n    return x + torch.zeros(3)\n"
                   "\ndef fine(x):\n    return torch.zeros(3, device=x.device)\n")
    monkeypatch.setattr(lint, "REPO", str(tmp_path))
    assert lint._device_less_factories("bad.py") == [("step", 4, "zeros")]
