"""The xdist schedule in tests/conftest.py names modules that exist: a renamed module would
silently drop out of its serial group or its early start."""

from __future__ import annotations

import os

from tests import conftest


def test_the_xdist_schedule_names_existing_modules():
    here = os.path.dirname(os.path.abspath(__file__))
    named = [*conftest.LONGEST_FIRST, *conftest.SERIAL_GROUPS]
    assert [n for n in named if not os.path.isfile(os.path.join(here, n))] == []
    assert len(set(conftest.LONGEST_FIRST)) == len(conftest.LONGEST_FIRST)
