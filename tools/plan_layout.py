#!/usr/bin/env python
"""`python tools/plan_layout.py`: the Megatron-style spelling of the `dynamoe-plan` command.

The code is megatron_dynamoe/cli/plan_layout.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.plan_layout import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
