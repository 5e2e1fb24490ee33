"""Run a command-line tool (tools/*.py, launch/*.py) the way a user does, or in-process."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool_process(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as a real process (exit code and stderr as a user sees them);
    `script` is relative to the repository root, e.g. 'tools/moefy.py'."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def load_script(script: str):
    """A script of the repository (path relative to its root, e.g. 'bench/bench_layer.py' or
    'tools/moefy.py') loaded as a module in this process."""
    name = "script_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_main(script: str):
    """The `main(argv)` of a tool script (relative to the repository root), loaded in this
    process."""
    return load_script(script).main


def run_tool_here(script: str, *args) -> subprocess.CompletedProcess:
    """The same tool's `main` through `cli.run_tool` in this process (saves ~6 s of imports per
    call), stderr captured; returns what `run_tool_process` would."""
    from megatron_dynamoe.cli.common import run_tool

    stderr = io.StringIO()
    environ = dict(os.environ)
    try:
        with contextlib.redirect_stderr(stderr):
            code = run_tool(tool_main(script), [str(a) for a in args])
    finally:
        # launch/train.py exports the launcher's RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_*
        # (as it should in its own process): they must not leak into later tests' children.
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(args, code, "", stderr.getvalue())
