#!/usr/bin/env python
"""`python launch/train.py`: the Megatron-style spelling of the `dynamoe-train` command.

The code is megatron_dynamoe/cli/train.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.train import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
