"""The package's layers: no import cycles at module level, nothing in the library imports the
command-line layer (`megatron_dynamoe.cli`), which only the tools' entry points use, and every
layer imports only from the layers below it (known exceptions listed). Read from the sources
(ast), so lazy imports inside functions count for the last two rules."""

from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "megatron_dynamoe")


def _modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    found = {}
    root = os.path.dirname(PACKAGE)
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules: dict, top_level_only: bool) -> set:
    """The package modules `path` imports (`from a.b import c` counts as a.b.c when that is
    a module, else as a.b)."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name in modules}


def _cycle(graph: dict):
    """One import cycle of `graph` as a list of modules, or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules, top_level_only=True) - {name}
             for name, path in modules.items()}
    assert len(graph) > 60
    assert _cycle(graph) is None


def test_the_library_never_imports_the_command_line_layer():
    modules = _modules()
    offenders = {name: sorted(m for m in _imports(path, modules, top_level_only=False)
                              if m == "megatron_dynamoe.cli" or
                              m.startswith("megatron_dynamoe.cli."))
                 for name, path in modules.items()
                 if not name.startswith("megatron_dynamoe.cli")}
    assert {k: v for k, v in offenders.items() if v} == {}
    # The rule bites: the tools themselves do import it.
    assert "megatron_dynamoe.cli.common" in _imports(
        modules["megatron_dynamoe.cli.moefy"], modules, top_level_only=True)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# Layers bottom to top: a module may import (at load time or lazily) only from its own layer
# and the layers below. `models` builds the DynaMoE core's layers into GPTModels (as
# Megatron-Core's models/ sits on transformer/moe); `utils` runs models (logit parity).
# models.registry names the families' providers as strings, so it builds the upper layers'
# models without importing them.
LAYERS = ("runtime", "dynamoe", "models", "utils", "checkpoint", "adaptive", "data",
          "training", "baselines", "evaluation", "planning", "cli")
# Imports that go up a layer (known debts) would be listed here; a new one fails the test.
KNOWN_UPWARD: set = set()


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_layers_import_only_downwards():
    modules = _modules()
    assert {_layer(m) for m in modules} - {""} == set(LAYERS)
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = {(name, target) for name, path in modules.items() if _layer(name)
              for target in _imports(path, modules, top_level_only=False)
              if _layer(target) and rank[_layer(target)] > rank[_layer(name)]}
    assert upward == KNOWN_UPWARD
