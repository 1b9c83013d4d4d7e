"""What the user asks for: a parameter, MAC and/or latency budget.

Each budget is a fraction of the dense value (``0.4``), a percentage string (``"40%"``) or an
absolute count (``2_000_000``); a latency budget is a fraction, a percentage or milliseconds
(``"12ms"``) of the dense model's measured latency (:mod:`hfp_fx.plan.latency`).
``Target.resolve`` turns them into absolute values (integers; milliseconds for latency).

    >>> Target.parse("40%").resolve(Counts(100, 1000))
    ResolvedTarget(params=None, macs=400)
    >>> Target.parse({"params": 0.5, "macs": 300}).resolve(Counts(100, 1000))
    ResolvedTarget(params=50, macs=300)
    >>> Target(latency="50%").resolve(Counts(100, 1000), dense_latency_ms=8.0).latency
    4.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from hfp_fx.plan.cost import Counts

__all__ = ["Target", "ResolvedTarget"]

Budget = Union[int, float, str, None]


def _check_latency(value: Budget) -> Budget:
    """A fraction of the dense latency, a percentage, or ``"<number>ms"`` (kept as the string)."""
    if isinstance(value, str) and value.strip().endswith("ms"):
        try:
            ms = float(value.strip()[:-2])
        except ValueError:
            raise ValueError(f"target latency={value!r} is malformed; use e.g. '50%', 0.5 or '12ms'") from None
        if not ms > 0:
            raise ValueError(f"target latency={value!r} must be positive")
        return f"{ms}ms"
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and not value.strip().endswith("%") \
            and _is_number_above_one(value):
        raise ValueError(f"target latency={value!r}: give a fraction of the dense latency (0.5, '50%') "
                         "or milliseconds as a string ('12ms')")
    return _check("latency", value)


def _is_number_above_one(text: str) -> bool:
    try:
        return float(text) > 1
    except ValueError:
        return False


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
    latency: Optional[float] = None  #: milliseconds

    def __repr__(self) -> str:  # latency only when targeted: most budgets are params/MACs
        extra = "" if self.latency is None else f", latency={self.latency}"
        return f"ResolvedTarget(params={self.params}, macs={self.macs}{extra})"

    def items(self):
        return [(k, v) for k, v in (("params", self.params), ("macs", self.macs), ("latency", self.latency))
                if v is not None]


@dataclass(frozen=True)
class Target:
    """A budget for ``params``, ``macs`` and/or ``latency``; at least one must be given."""

    params: Budget = None
    macs: Budget = None
    latency: Budget = None

    def __post_init__(self):
        object.__setattr__(self, "params", _check("params", self.params))
        object.__setattr__(self, "macs", _check("macs", self.macs))
        object.__setattr__(self, "latency", _check_latency(self.latency))
        if self.params is None and self.macs is None and self.latency is None:
            raise ValueError("a target needs params, macs and/or latency, e.g. Target(macs='40%')")

    def __repr__(self) -> str:
        extra = "" if self.latency is None else f", latency={self.latency!r}"
        return f"Target(params={self.params!r}, macs={self.macs!r}{extra})"

    @classmethod
    def parse(cls, value: Any) -> "Target":
        """Accept a Target, a dict, or a bare fraction/percentage/count (meaning MACs)."""
        if isinstance(value, Target):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"params", "macs", "latency"}
            if unknown:
                raise ValueError(f"target keys must be 'params', 'macs' and/or 'latency', got {sorted(unknown)}")
            return cls(**value)
        return cls(macs=value)

    def resolve(self, dense: Counts, dense_latency_ms: Optional[float] = None) -> ResolvedTarget:
        def absolute(v, total):
            if v is None:
                return None
            return int(v * total) if isinstance(v, float) else int(v)

        latency = None
        if isinstance(self.latency, str):
            latency = float(self.latency[:-2])
        elif self.latency is not None:
            if dense_latency_ms is None:
                raise ValueError("a latency target needs the dense model's measured latency (a latency model)")
            latency = self.latency * dense_latency_ms
        return ResolvedTarget(absolute(self.params, dense.params), absolute(self.macs, dense.macs), latency)
