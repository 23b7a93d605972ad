"""The small interface every runtime backend implements, and the registry of backends.

A backend owns the buffers of one artifacts folder: it allocates them once, binds each step's token and
KV-cache outputs as the next step's inputs, and runs step i / the decoder / the encoder on request. The
pipeline (``restok.runtime.pipeline``) only fills inputs, calls ``run_step`` in schedule order and reads
results: it never sees a framework type.
"""

from __future__ import annotations

import abc
from importlib import import_module
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest

BACKENDS = {
    "onnxruntime": "restok.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "torch": "restok.runtime.torch_backend:TorchBackend",
    "tensorrt": "restok.runtime.tensorrt_backend:TensorRTBackend",
}


class Backend(abc.ABC):
    """Runs the graphs of one artifacts folder. Buffers are allocated in ``__init__`` and reused."""

    name: str = "?"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.threads = threads

    @abc.abstractmethod
    def set_inputs(self, labels: np.ndarray, noise: np.ndarray, cfg_scales: list[float], temperature: float,
                   top_k: int, top_p: float) -> None:
        """Copy one generation's inputs into the bound buffers.

        labels int64 [R] (the null class already in rows B.. with guidance), noise float32 [B, N, V],
        one CFG scale per step."""

    @abc.abstractmethod
    def run_step(self, i: int) -> None:
        """Run pass i; its next_tokens and present KV become pass i+1's inputs without a copy."""

    @abc.abstractmethod
    def step_tokens(self, i: int) -> np.ndarray:
        """int64 [R, n]: the tokens sampled by pass i (valid after run_step(i))."""

    @abc.abstractmethod
    def step_logits(self, i: int) -> np.ndarray:
        """float32 [R, n, V]: the raw logits of pass i (valid after run_step(i))."""

    @abc.abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [B, N] -> float32 [B, 3, S, S]."""

    def run_fused(self, decode: bool = True) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Run every pass (and the decoder) in one go -> (tokens [B, N], images or None), or None when the
        backend only runs pass by pass (then the pipeline calls run_step)."""
        return None

    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [B, 3, S, S] in [0, 1] -> int64 [B, N]."""
        raise ArtifactError(f"the {self.name} backend has no encoder for these artifacts")

    def close(self) -> None:
        """Release sessions and buffers."""


def backend_names() -> list[str]:
    return list(BACKENDS)


def create_backend(name: str, folder: Path, manifest: Manifest, threads: int | None = None, **options) -> Backend:
    """``options`` go to the backend (onnxruntime: low_memory)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        mod = import_module(module)
    except ImportError as e:
        raise ImportError(f"the {name} backend is not available here: {e}") from e
    return getattr(mod, cls)(folder, manifest, threads, **options)
