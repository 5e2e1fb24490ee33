"""Interval: the allowed range of a numeric setting, and the one wording of its complaints.

Both the trainer's config checks (`training.config.RANGES`) and the tools' argparse types
(`cli.common.number`) state ranges with it, so `--x 0 is out of range: give a value in [1,
inf)` reads the same wherever it is raised. Floats must also be finite: NaN / Inf are never a
meaningful setting (an infinite learning rate trains NaN from the second step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Interval:
    """Values of `kind` (int or float) in [low, high]; an end is open with `low_open` /
    `high_open` and unbounded when None. `kind` is what a command-line value is parsed as;
    `check` refuses any non-finite float whatever the kind."""

    kind: type = float
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """The interval in math notation, e.g. '[1, inf)' or '(0, 1]'."""
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else _plain(self.low)
        high = "inf" if self.high is None else _plain(self.high)
        return f"{left}{low}, {high}{right}"

    def contains(self, value) -> bool:
        """Whether `value` lies inside (a non-finite float never does)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else
                                     value <= self.high)

    def message(self, subject: str, value) -> Optional[str]:
        """The one-line complaint about `value`, which the line calls `subject` (e.g. "--lr
        -1" or "'-1'"), or None when `value` is inside."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{subject}: give a finite number"
        if not self.contains(value):
            return f"{subject} is out of range: give a value in {self.describe()}"
        return None

    def check(self, name: str, value):
        """Return `value`, or raise ValueError `{name} {value} is out of range: give a value
        in [low, high]` (`{name} {value}: give a finite number` for NaN / Inf)."""
        problem = self.message(f"{name} {value}", value)
        if problem:
            raise ValueError(problem)
        return value


def _plain(value) -> str:
    # 1 rather than 1.0 in the text: the bounds are written as the user would type them.
    return str(int(value)) if float(value).is_integer() else str(value)


# The ranges most settings fall in.
ANY = Interval(float)                        # any finite number
COUNT = Interval(int, 1)                     # sizes, counts, lengths
NON_NEGATIVE_INT = Interval(int, 0)
POSITIVE = Interval(float, 0, low_open=True)
NON_NEGATIVE = Interval(float, 0)
UNIT = Interval(float, 0, 1)                 # a fraction or weight in [0, 1]
