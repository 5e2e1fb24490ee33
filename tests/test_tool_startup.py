"""A tool's start-up prints what matters, not upstream noise."""

from __future__ import annotations

import subprocess
import sys

from tests.tool_runner import run_tool_process


def test_tools_start_without_the_upstream_not_installed_warnings():
    # megatron-core warns on import that TE / Apex are not installed (seen in a bare
    # interpreter); the tools filter exactly those (runtime.upstream_warnings).
    bare = subprocess.run([sys.executable, "-c", "import megatron.core.optimizer"],
                          capture_output=True, text=True, timeout=300)
    assert "Transformer Engine and Apex are not installed" in bare.stderr
    done = run_tool_process("tools/plan_layout.py", "--model", "tiny-llama", "--num-gpus", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verdict: fits" in done.stdout
    assert "not installed" not in done.stderr, done.stderr[-2000:]
