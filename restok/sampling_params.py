"""Sampling settings: the one place that declares each setting, its default and its bounds (no torch).

Every face derives from the fields of ``SamplingParams``: the CLI's sampling group
(``restok.cli.common.add_sampling_args``), the HTTP request model (``restok.serving.app``), the PyTorch API
(``restok.generate``) and the runtime (``Pipeline.generate``), which take a ``SamplingParams`` (or one per
image) with the same default, ``SamplingParams()``: the paper's gFID 2.34 settings.

Bounds are checked when a ``SamplingParams`` is made, so an invalid one never exists: a float must be
finite, inside float32's range (the graphs compute in float32) and inside the setting's own sensible
range; an integer must be an integer inside its range (which lies inside int64, the graph's dtype). A NaN
temperature would sample token 0 everywhere and a guidance scale of 1e300 is infinite in float32: both
used to give garbage with exit code 0.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import numpy as np

from restok.schedule import CFG_SCHEDULES, HARSchedule, cfg_scale_at

__all__ = ["SamplingParams", "Setting", "SEED_LIMIT", "check_seed", "per_image", "batch_settings"]

SEED_LIMIT = 2**63  # seeds and stream indices are integers in [0, 2^63) (numpy's SeedSequence takes them)


def _setting(default, help: str, lo=None, hi=None, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices})


@dataclass(frozen=True)
class Setting:
    """One sampling setting as every face sees it (derived from a ``SamplingParams`` field)."""

    name: str
    default: object
    help: str
    lo: float | None
    hi: float | None
    choices: tuple[str, ...] | None

    @property
    def kind(self) -> type:
        return type(self.default)  # float, int or str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_range(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.kind is int:
            return f"an integer in [{self.lo}, {self.hi}]"
        return f"a finite number in [{self.lo:g}, {self.hi:g}]"

    def check(self, value):
        """``value`` as this setting's type, or ValueError naming the setting and its range."""
        if self.choices:
            if not isinstance(value, str) or value not in self.choices:
                raise ValueError(f"{self.name} must be {self.describe_range()}, got {value!r}")
            return value
        if self.kind is int:
            ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and \
                (isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer()))
            if not ok or not self.lo <= value <= self.hi:
                raise ValueError(f"{self.name} must be {self.describe_range()}, got {value!r}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
                or not self.lo <= float(value) <= self.hi:
            raise ValueError(f"{self.name} must be {self.describe_range()}, got {value!r}")
        return float(value)

    def parse(self, text: str):
        """A command-line value (argparse ``type=``)."""
        import argparse

        if self.choices:
            value = text
        else:
            try:
                value = int(text) if self.kind is int else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {self.describe_range()}, got {text!r}") from None
        try:
            return self.check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class SamplingParams:
    """How one image is sampled. Defaults: the paper's gFID 2.34 settings; ``cfg_scale`` <= 1: no guidance."""

    cfg_scale: float = _setting(3.75, "classifier-free guidance scale; <= 1 disables guidance", 0.0, 100.0)
    cfg_schedule: str = _setting("step", "how guidance changes over the passes", choices=CFG_SCHEDULES)
    cfg_start: float = _setting(0.25, "progress at which the 'step' schedule turns guidance on", 0.0, 1.0)
    temperature: float = _setting(1.0, "softmax temperature; 0 takes the most likely token", 0.0, 100.0)
    top_k: int = _setting(0, "keep the k most likely tokens; 0 keeps all", 0, 2**31 - 1)
    top_p: float = _setting(0.95, "nucleus sampling: keep the most likely tokens up to this mass; 1 keeps all",
                            0.0, 1.0)

    def __post_init__(self) -> None:
        for s in self.settings():
            object.__setattr__(self, s.name, s.check(getattr(self, s.name)))

    @classmethod
    def settings(cls) -> tuple[Setting, ...]:
        """Every setting with its default, help and bounds, in declaration order."""
        return tuple(Setting(f.name, f.default, f.metadata["help"], f.metadata["lo"], f.metadata["hi"],
                             f.metadata["choices"]) for f in fields(cls))

    def validate(self) -> "SamplingParams":
        """Checked when made; kept so callers can say where they rely on it."""
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


def check_seed(seed, name: str = "seed") -> int:
    """Seeds and stream indices are integers in [0, 2^63)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2^63), got {seed!r}")
    return int(seed)


def per_image(sampling: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    """One SamplingParams per image: ``sampling`` for all of them, or a sequence of ``count``."""
    if isinstance(sampling, SamplingParams):
        return [sampling] * count
    if isinstance(sampling, (str, bytes, dict)) or not isinstance(sampling, Sequence):
        raise TypeError(f"sampling must be a SamplingParams or a sequence of them, got {type(sampling).__name__}")
    params = list(sampling)
    if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling must be one SamplingParams or one per image ({count}); got "
                         f"{len(params)} items of types {sorted({type(p).__name__ for p in params})}")
    return params


def batch_settings(params: list[SamplingParams], schedule: HARSchedule) -> dict[str, np.ndarray]:
    """The per-image arrays of a run, as the generator graph takes them: ``cfg_scale`` float32 [steps, b]
    (1.0 where an image is not guided), ``temperature``/``top_p`` float32 [b], ``top_k`` int64 [b]."""
    scales = {id(p): p.cfg_scales(schedule) for p in params}
    return {"cfg_scale": np.ascontiguousarray(np.asarray([scales[id(p)] for p in params], np.float32).T),
            "temperature": np.asarray([p.temperature for p in params], np.float32),
            "top_k": np.asarray([p.top_k for p in params], np.int64),
            "top_p": np.asarray([p.top_p for p in params], np.float32)}
