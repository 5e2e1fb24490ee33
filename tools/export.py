#!/usr/bin/env python
"""`python tools/export.py`: the Megatron-style spelling of the `dynamoe-export` command.

The code is megatron_dynamoe/cli/export.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.export import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
