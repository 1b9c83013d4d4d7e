"""What the user asks for: a parameter and/or MAC budget.

Each budget is a fraction of the dense value (``0.4``), a percentage string (``"40%"``) or an
absolute count (``2_000_000``).  ``Target.resolve`` turns it into absolute integers.

    >>> Target.parse("40%").resolve(Counts(100, 1000))
    ResolvedTarget(params=None, macs=400)
    >>> Target.parse({"params": 0.5, "macs": 300}).resolve(Counts(100, 1000))
    ResolvedTarget(params=50, macs=300)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from hfp_fx.cost import Counts

__all__ = ["Target", "ResolvedTarget"]

Budget = Union[int, float, str, None]


def _check(name: str, value: Budget) -> Budget:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"target {name}={value!r} is not a number")
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                frac = float(text[:-1]) / 100.0
            else:
                frac = float(text)
        except ValueError:
            raise ValueError(f"target {name}={value!r} is malformed; use e.g. '40%', 0.4 or an absolute count") from None
        if not text.endswith("%") and frac > 1 and frac != int(frac):
            raise ValueError(f"target {name}={value!r}: above 1 a target is an absolute count and must be whole")
        return _check(name, frac if text.endswith("%") or frac <= 1 else int(frac))
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"target {name}={value} must be a fraction in (0, 1] of the dense model "
                             "(or a percentage string like '40%', or an absolute int count)")
        return value
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"target {name}={value} must be positive")
        return value
    raise ValueError(f"target {name}={value!r} must be a float fraction, a 'NN%' string or an int count")


@dataclass(frozen=True)
class ResolvedTarget:
    params: Optional[int]
    macs: Optional[int]

    def items(self):
        return [(k, v) for k, v in (("params", self.params), ("macs", self.macs)) if v is not None]


@dataclass(frozen=True)
class Target:
    """A budget for ``params`` and/or ``macs``; at least one must be given."""

    params: Budget = None
    macs: Budget = None

    def __post_init__(self):
        object.__setattr__(self, "params", _check("params", self.params))
        object.__setattr__(self, "macs", _check("macs", self.macs))
        if self.params is None and self.macs is None:
            raise ValueError("a target needs params and/or macs, e.g. Target(macs='40%')")

    @classmethod
    def parse(cls, value: Any) -> "Target":
        """Accept a Target, a dict, or a bare fraction/percentage/count (meaning MACs)."""
        if isinstance(value, Target):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"params", "macs"}
            if unknown:
                raise ValueError(f"target keys must be 'params' and/or 'macs', got {sorted(unknown)}")
            return cls(**value)
        return cls(macs=value)

    def resolve(self, dense: Counts) -> ResolvedTarget:
        def absolute(v, total):
            if v is None:
                return None
            return int(v * total) if isinstance(v, float) else int(v)

        return ResolvedTarget(absolute(self.params, dense.params), absolute(self.macs, dense.macs))
