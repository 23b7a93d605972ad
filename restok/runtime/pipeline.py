"""The generation pipeline over a backend: the schedule's passes in order, then the tokenizer decoder."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.noise import gumbel_noise
from restok.runtime.backend import Backend, create_backend
from restok.schedule import CFG_SCHEDULES, cfg_scale_at


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are the paper's gFID 2.34 settings."""

    cfg_scale: float = 3.75
    cfg_schedule: str = "step"
    cfg_start: float = 0.25
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95

    def validate(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg schedule {self.cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 disables), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (1 disables), got {self.top_p}")


@dataclass
class Generation:
    tokens: np.ndarray  # int64 [B, N]
    images: np.ndarray | None  # float32 [B, 3, S, S], not clamped
    step_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0
    step_logits: list[np.ndarray] | None = None
    fused_seconds: float = 0.0  # backends that run the whole image at once (TensorRT CUDA graph)

    @property
    def generate_seconds(self) -> float:
        return sum(self.step_seconds) or self.fused_seconds


class Pipeline:
    """Generate images from an artifacts folder with one backend (ONNX Runtime by default)."""

    def __init__(self, artifacts: str | Path, backend: str | Backend = "onnxruntime", threads: int | None = None,
                 manifest: Manifest | None = None, **backend_options):
        self.folder = Path(artifacts)
        self.manifest = manifest or Manifest.read(self.folder)
        self.schedule = self.manifest.har_schedule()
        self.backend: Backend = (backend if isinstance(backend, Backend)
                                 else create_backend(backend, self.folder, self.manifest, threads, **backend_options))

    @property
    def batch(self) -> int:
        return self.manifest.batch

    def close(self) -> None:
        self.backend.close()

    def _labels(self, labels) -> np.ndarray:
        m = self.manifest
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D list of integer class ids, got {labels!r}")
        if labels.shape[0] != m.batch:
            raise ArtifactError(
                f"these artifacts were exported for batch {m.batch}; got {labels.shape[0]} labels "
                f"(pass {m.batch} labels, or re-export with --batch {labels.shape[0]})"
            )
        bad = labels[(labels < 0) | (labels >= m.num_classes)]
        if bad.size:
            raise ValueError(f"class ids {bad.tolist()} are outside [0, {m.num_classes}) for this model")
        return labels.astype(np.int64)

    def generate(self, labels, sampling: SamplingParams = SamplingParams(), *, seed: int = 0, noise_start: int = 0,
                 noise: np.ndarray | None = None, decode: bool = True, keep_logits: bool = False) -> Generation:
        """One batch: ``labels`` must hold exactly ``batch`` class ids. Noise comes from ``seed`` (image
        ``noise_start + b`` uses stream b) unless given as Gumbel noise [B, N, V]."""
        sampling.validate()
        m = self.manifest
        labels = self._labels(labels)
        B, N, V = m.batch, m.num_tokens, m.vocab_size
        guided = sampling.cfg_scale > 1.0
        if guided and not m.guided:
            raise ArtifactError("these artifacts were exported without guidance (--no-cfg); re-export to use cfg_scale > 1")
        if noise is None:
            noise = gumbel_noise(seed, B, N, V, start=noise_start)
        elif noise.shape != (B, N, V):
            raise ValueError(f"noise must have shape {(B, N, V)}, got {noise.shape}")
        rows = np.concatenate([labels, np.full(B, m.num_classes, dtype=np.int64)]) if m.guided else labels
        scales = [cfg_scale_at(sampling.cfg_schedule, sampling.cfg_scale, st.cfg_ratio, sampling.cfg_start) if guided else 1.0
                  for st in self.schedule.steps]
        be = self.backend
        be.set_inputs(rows, noise.astype(np.float32, copy=False), scales, sampling.temperature, sampling.top_k, sampling.top_p)
        if not keep_logits:
            t0 = time.perf_counter()
            fused = be.run_fused(decode)
            if fused is not None:  # one CUDA-graph replay: no per-pass timings
                return Generation(fused[0], fused[1], [], 0.0, None, fused_seconds=time.perf_counter() - t0)
        tokens = np.empty((B, N), dtype=np.int64)
        times, logits = [], [] if keep_logits else None
        for st in self.schedule.steps:
            t0 = time.perf_counter()
            be.run_step(st.index)
            times.append(time.perf_counter() - t0)
            tokens[:, st.predicts[0] : st.predicts[-1] + 1] = be.step_tokens(st.index)[:B]
            if keep_logits:
                logits.append(np.array(be.step_logits(st.index)))
        images, dt = None, 0.0
        if decode:
            t0 = time.perf_counter()
            images = np.array(be.decode(tokens))
            dt = time.perf_counter() - t0
        return Generation(tokens, images, times, dt, logits)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        m = self.manifest
        tokens = np.asarray(tokens)
        if tokens.shape != (m.batch, m.num_tokens):
            raise ValueError(f"tokens must have shape {(m.batch, m.num_tokens)}, got {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= m.vocab_size:
            raise ValueError(f"token ids must lie in [0, {m.vocab_size})")
        return np.array(self.backend.decode(tokens.astype(np.int64)))

    def encode(self, images: np.ndarray) -> np.ndarray:
        m = self.manifest
        s = m.image_size
        if images.shape != (m.batch, 3, s, s):
            raise ValueError(f"images must have shape {(m.batch, 3, s, s)} with values in [0, 1], got {images.shape}")
        return np.array(self.backend.encode(images.astype(np.float32)))
