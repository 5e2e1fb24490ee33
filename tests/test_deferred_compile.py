"""Megatron-Core's fusions compile at their first call (runtime/deferred_compile.py): importing
Megatron-Core through megatron_dynamoe no longer imports TorchDynamo, and a deferred function
computes what `torch.compile` of it computes, compiled once."""

from __future__ import annotations

import subprocess
import sys

import torch

from megatron_dynamoe.runtime import deferred_compile as D


def test_importing_megatron_core_through_megatron_dynamoe_imports_no_dynamo():
    script = (
        "import sys, megatron_dynamoe\n"
        "import megatron.core.models.gpt, megatron.core.optimizer\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions import fused_bias_swiglu, fused_bias_geglu\n"
        "from megatron_dynamoe.runtime.deferred_compile import deferred_compile\n"
        "assert 'torch._dynamo' not in sys.modules, 'TorchDynamo imported'\n"
        "assert jit.jit_fuser is deferred_compile, jit.jit_fuser\n"
        "for f in (fused_bias_swiglu.swiglu, fused_bias_geglu.geglu):\n"
        "    assert f.__dynamoe_deferred_compile__ and f.__wrapped__.__name__ == f.__name__\n"
        "import inspect\n"
        "assert 'def swiglu' in inspect.getsource(fused_bias_swiglu)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _counting_backend(counter):
    def backend(graph_module, example_inputs):
        counter.append(len(example_inputs))
        return graph_module.forward
    return backend


def test_deferred_function_compiles_once_at_its_first_call_and_computes_the_same():
    compiled = []

    def gelu_mul(x, y):
        return torch.nn.functional.gelu(x) * y

    fn = D.deferred_compile(gelu_mul, backend=_counting_backend(compiled))
    decorated = D.deferred_compile(backend=_counting_backend(compiled))(gelu_mul)
    assert compiled == [] and fn.__wrapped__ is gelu_mul and fn.__name__ == "gelu_mul"
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(fn(x, y), gelu_mul(x, y))
    assert len(compiled) == 1  # compiled at the first call, by torch.compile's backend
    assert torch.equal(fn(x, y=y), gelu_mul(x, y)) and len(compiled) == 1  # not again
    assert torch.equal(decorated(x, y), gelu_mul(x, y)) and len(compiled) == 2


def test_modules_compile_at_once_and_install_is_a_no_op_after_megatron():
    import megatron.core.jit  # noqa: F401  (imported by the test session already)

    module = D.deferred_compile(torch.nn.Linear(3, 3), backend="eager")
    assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
    finders = list(sys.meta_path)
    D.install()
    assert sys.meta_path == finders
