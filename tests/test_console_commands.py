"""The installed package works without the repository: a regular (not editable) install's
console commands start, print their help, and one does real work from an unrelated folder."""

from __future__ import annotations

import json
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


# Runs every installed console script (the file pip generated in bin/) with --help in ONE
# interpreter, so that the twelve commands pay Megatron-Core's import once, not twelve times
# (~8 s each on the CI machine); the last test starts a console script as its own process.
HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    out[path] = (code, text.getvalue())
import megatron_dynamoe
print(json.dumps({"package": megatron_dynamoe.__file__, "commands": out}))
"""


@pytest.fixture(scope="module")
def helps(installed):
    """{command: (exit code, stdout)} of `COMMAND --help` for every console command, and the
    file the package was imported from."""
    target, env, cwd = installed
    paths = [str(target / "bin" / command) for command in COMMANDS]
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *paths], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["package"], {os.path.basename(p): tuple(v)
                               for p, v in result["commands"].items()}


def test_the_installed_copy_is_imported_not_the_repository(installed, helps):
    target, _, _ = installed
    package, _ = helps
    assert package.startswith(str(target)), package


@pytest.mark.parametrize("command", COMMANDS)
def test_every_console_command_prints_its_help(helps, command):
    code, stdout = helps[1][command]
    assert code in (0, None), (code, stdout[-2000:])
    assert stdout.startswith("usage: ") and "--help" in stdout


def test_a_console_command_works_outside_the_repository(installed):
    target, env, cwd = installed
    done = subprocess.run([sys.executable, str(target / "bin" / "dynamoe-plan"), "--model",
                           "tiny-llama", "--num-gpus", "2"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verdict: fits" in done.stdout
