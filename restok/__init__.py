"""restok: the ResTok tokenizer and its HAR generator, from PyTorch to fast, verified inference.

``import restok`` stays light (no torch): the PyTorch API below is imported on first use, so the runtime
(``restok.runtime``) works on machines without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from restok.sampling_params import SamplingParams
from restok.schedule import HARSchedule, HARStep

__version__ = "0.1.0"

_LAZY = {
    "load_tokenizer": "restok.checkpoints",
    "load_generator": "restok.checkpoints",
    "save_checkpoint": "restok.checkpoints",
    "CheckpointError": "restok.checkpoints",
    "generate": "restok.generation",
    "build_tokenizer": "restok.models.presets",
    "build_generator": "restok.models.presets",
    "PRESETS": "restok.models.presets",
}

if TYPE_CHECKING:  # pragma: no cover
    from restok.checkpoints import CheckpointError, load_generator, load_tokenizer, save_checkpoint
    from restok.generation import generate
    from restok.models.presets import PRESETS, build_generator, build_tokenizer


def __getattr__(name: str):
    if name in _LAZY:
        try:
            value = getattr(import_module(_LAZY[name]), name)
        except ImportError as e:
            missing = (e.name or str(e)).split(".")[0]
            if any(m in missing for m in ("torch", "safetensors")):
                raise ImportError(
                    f"restok.{name} needs PyTorch; install it with: pip install 'restok[torch]' "
                    "(the runtime, restok.runtime, works without it)"
                ) from e
            raise
        globals()[name] = value
        return value
    raise AttributeError(f"module 'restok' has no attribute {name!r}")


__all__ = ["HARSchedule", "HARStep", "SamplingParams", "__version__", *_LAZY]
