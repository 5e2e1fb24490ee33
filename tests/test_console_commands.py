"""The installed package works without the repository: a regular (not editable) install's
console commands start, print their help, and one does real work from an unrelated folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("dynamoe-convert", "dynamoe-moefy", "dynamoe-export", "dynamoe-upcycle",
            "dynamoe-evaluate", "dynamoe-train", "dynamoe-topk", "dynamoe-plan",
            "dynamoe-preprocess", "dynamoe-profile-curriculum", "dynamoe-sample-text",
            "dynamoe-main")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --target` of this repository (a built, non-editable copy) and an
    environment that sees only it, run from a folder outside the repository."""
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--target", str(target), REPO],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    return target, env, tmp_path_factory.mktemp("elsewhere")


def test_the_installed_copy_is_imported_not_the_repository(installed):
    target, env, cwd = installed
    done = subprocess.run([sys.executable, "-c", "import megatron_dynamoe.cli.moefy as m; "
                           "print(m.__file__)"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(target))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_console_command_prints_its_help(installed, command):
    target, env, cwd = installed
    done = subprocess.run([sys.executable, str(target / "bin" / command), "--help"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ") and "--help" in done.stdout


def test_a_console_command_works_outside_the_repository(installed):
    target, env, cwd = installed
    done = subprocess.run([sys.executable, str(target / "bin" / "dynamoe-plan"), "--model",
                           "tiny-llama", "--num-gpus", "2"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verdict: fits" in done.stdout
