#!/usr/bin/env python
"""`python tools/upcycle.py`: the Megatron-style spelling of the `dynamoe-upcycle` command.

The code is megatron_dynamoe/cli/upcycle.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.upcycle import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
