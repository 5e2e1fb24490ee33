"""Megatron-Core's fusion functions compiled at their first call instead of decorated with
`torch.compile` at import.

`megatron.core.jit.jit_fuser` is `torch.compile`, and Megatron-Core decorates its fusion
functions with it while `megatron.core` is imported. `torch.compile` compiles nothing until
the first call, but it imports TorchDynamo, Inductor and sympy when it decorates: 2-3 s of a
process's start on a 2-core machine (`python -X importtime`: the module
`megatron.core.fusions.fused_bias_geglu` took 2.6 s of `megatron.core`'s 4.4; importing
`megatron.core.models.gpt` and `megatron.core.optimizer` takes 5.5 s with this module instead
of 8.3-8.8 s). Tools that build no optimizer (conversion, MoEfy, evaluation, export,
preprocessing, planning) never need TorchDynamo otherwise; training still imports it when
`torch.optim` builds its optimizer. On the CPU no fusion function is called (a DynaMoE
training step with labels, `bench/bench_train_step.py --quick`, compiles none).

`install()` (run by `import megatron_dynamoe`) lets `megatron.core.jit` load as usual and
then replaces its `jit_fuser` by `deferred_compile`, which calls `torch.compile` with the same
arguments at the first call of each decorated function: the same `torch.compile` of the same
function, at the moment it compiled anyway. When `megatron.core` was imported before
`megatron_dynamoe`, nothing changes.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys

_JIT_MODULE = "megatron.core.jit"


def deferred_compile(model=None, **kwargs):
    """`torch.compile(model, **kwargs)` at the first call of `model` (a plain function);
    anything else (an `nn.Module`, a callable object) goes to `torch.compile` at once. As
    `torch.compile`, without `model` it returns a decorator taking the same arguments."""
    if model is None:
        return functools.partial(deferred_compile, **kwargs)
    import torch

    if not inspect.isfunction(model):
        return torch.compile(model, **kwargs)
    compiled = None

    @functools.wraps(model)
    def call(*args, **call_kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(model, **kwargs)
        return compiled(*args, **call_kwargs)

    call.__dynamoe_deferred_compile__ = True
    return call


class _JitModuleLoader(importlib.abc.Loader):
    """Loads `megatron.core.jit` with its own loader, then defers its `jit_fuser`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        import torch

        if getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = deferred_compile

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _JitModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `megatron.core.jit` where Python would, and hands it to `_JitModuleLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _JIT_MODULE or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _JitModuleLoader(spec.loader)
        return spec


def install() -> None:
    """Defer the compilation of Megatron-Core's fusion functions to their first call (see the
    module docstring); a no-op once `megatron.core.jit` is imported, and when called twice."""
    if _JIT_MODULE in sys.modules:
        return
    if not any(isinstance(finder, _JitModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _JitModuleFinder())
