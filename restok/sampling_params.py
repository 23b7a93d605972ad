"""Sampling settings and their validation: one source for the CLI, the runtime and the PyTorch API (no torch).

Every float must be finite: a NaN temperature would sample token 0 everywhere and a NaN guidance scale
would silently turn guidance off, with exit code 0.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from restok.schedule import CFG_SCHEDULES, HARSchedule, cfg_scale_at

__all__ = ["SamplingParams", "check_seed"]


def _real(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {'in ' if hi is not None else ''}{rng}, got {value!r}")
    return v


def check_seed(seed, name: str = "seed") -> int:
    """Seeds are non-negative integers (numpy's SeedSequence takes no negative or fractional seed)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0 or int(seed) >= 2**63:
        raise ValueError(f"{name} must be an integer in [0, 2^63), got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are the paper's gFID 2.34 settings. ``cfg_scale`` <= 1 means no guidance."""

    cfg_scale: float = 3.75
    cfg_schedule: str = "step"
    cfg_start: float = 0.25
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95

    def validate(self) -> "SamplingParams":
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg schedule {self.cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
        _real("cfg_scale", self.cfg_scale, 0.0)
        _real("cfg_start", self.cfg_start, 0.0, 1.0)
        _real("temperature", self.temperature, 0.0)
        _real("top_p", self.top_p, 0.0, 1.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Real) or int(self.top_k) != self.top_k \
                or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables), got {self.top_k!r}")
        return self

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def cfg_scales(self, schedule: HARSchedule) -> list[float]:
        """The guidance scale of each pass (1.0 for every pass when not guided)."""
        if not self.guided:
            return [1.0] * schedule.num_steps
        return [cfg_scale_at(self.cfg_schedule, self.cfg_scale, st.cfg_ratio, self.cfg_start) for st in schedule.steps]

    def to_dict(self) -> dict:
        return asdict(self)
