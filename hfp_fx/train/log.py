"""Record ``hfp_fx.complexity(prepared)`` during training and plot the ratio curves.

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> prepared = hfp_fx.prepare(torchvision.models.resnet18(), x, "50%")
    >>> log = hfp_fx.ComplexityLog(prepared)
    >>> log.step()  # call once per training step (or every N steps)
    >>> round(log.history[-1]["macs_ratio"], 2)
    2.0
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from hfp_fx.analysis.viz import PathLike, _pyplot
from hfp_fx.train.hfp import complexity

__all__ = ["ComplexityLog"]


class ComplexityLog:
    """Record ``hfp_fx.complexity(prepared)`` during training and plot the ratio curves.

    Call :meth:`step` once per training step (it is cheap: one cost-model evaluation).
    """

    def __init__(self, prepared: torch.nn.Module, every: int = 1):
        self.prepared, self.every, self._n = prepared, max(1, every), 0
        self.history: List[Dict[str, float]] = []

    def step(self, **extra: float) -> None:
        if self._n % self.every == 0:
            row = complexity(self.prepared)
            row.update(step=self._n, **extra)
            self.history.append(row)
        self._n += 1

    def plot(self, path: PathLike) -> Path:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in self.history]
        for key in ("params_ratio", "macs_ratio"):
            values = [r[key] for r in self.history]
            if any(v is not None for v in values):
                ax.plot(steps, values, label=key.replace("_", " ") + " (hard)")
            name = key[:-len("_ratio")]
            ramp = [r.get(f"current_target_{name}") for r in self.history]
            if any(v is not None and v != r[f"target_{name}"] for v, r in zip(ramp, self.history)):
                ax.plot(steps, [None if v is None else v / r[f"target_{name}"] for v, r in zip(ramp, self.history)],
                        ls=":", label=f"{name} target ramp")
        ax.axhline(1.0, color="k", ls="--", lw=1, label="target")
        ax.set_xlabel("step")
        ax.set_ylabel("current / target")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)
