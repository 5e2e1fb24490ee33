#!/usr/bin/env python
"""`python tools/profile_curriculum.py`: the Megatron-style spelling of the `dynamoe-profile-curriculum` command.

The code is megatron_dynamoe/cli/profile_curriculum.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.profile_curriculum import (  # noqa: F401  (main: in-process runs)
    entry,
    main,
)

if __name__ == "__main__":
    entry()
