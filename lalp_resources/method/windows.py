"""Window arithmetic (docs/method.md, "Window"): step i is conditioned on the prompt and w(i) preceding steps.

Pure logic, no Dagster or torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowSpec:
    """`fixed:K` -> w(i) = min(i, K); `fraction:R` -> w(i) = min(i, ceil(R * i)).

    `fixed:all` (K = infinity) covers every preceding step: step scores then equal GALP's
    token log-probs grouped by step (the consistency property).
    """

    kind: str
    value: float

    @classmethod
    def parse(cls, spec: "str | WindowSpec") -> "WindowSpec":
        if isinstance(spec, WindowSpec):
            return spec
        text = str(spec).strip().lower()
        kind, sep, raw = text.partition(":")
        if not sep:
            raise ValueError(f"window spec {spec!r} must look like 'fixed:K' or 'fraction:R'")
        if kind == "fixed":
            if raw in ("all", "inf"):
                return cls("fixed", math.inf)
            try:
                k = int(raw)
            except ValueError:
                raise ValueError(f"window spec {spec!r}: K must be a non-negative integer or 'all'") from None
            if k < 0:
                raise ValueError(f"window spec {spec!r}: K must be >= 0")
            return cls("fixed", k)
        if kind == "fraction":
            try:
                r = float(raw)
            except ValueError:
                raise ValueError(f"window spec {spec!r}: R must be a number in [0, 1]") from None
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"window spec {spec!r}: R must be in [0, 1]")
            return cls("fraction", r)
        raise ValueError(f"window spec {spec!r}: kind must be 'fixed' or 'fraction'")

    def width(self, i: int) -> int:
        """Number of preceding steps that step i (0-based) sees."""
        if self.kind == "fixed":
            return int(min(i, self.value))
        return min(i, math.ceil(self.value * i - 1e-12))

    def start(self, i: int) -> int:
        """Index of the first step in step i's window."""
        return i - self.width(i)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return "fixed:all" if math.isinf(self.value) else f"fixed:{int(self.value)}"
        return f"fraction:{self.value:g}"
