"""The generation pipeline over a backend: the schedule's passes in order, then the tokenizer decoder.

One export serves every run of 1..max_batch images, and each image carries its own sampling settings and
its own random stream (image ``noise_start + k`` of run ``seed``): an image is the same whether it was
generated alone or inside any batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.noise import NOISE_KEYS, NOISE_PRIME, noise_keys
from restok.runtime.backend import Backend, create_backend
from restok.runtime.plan import RunInputs
from restok.sampling_params import SamplingParams, check_seed

__all__ = ["Generation", "Pipeline", "SamplingParams"]


@dataclass
class Generation:
    tokens: np.ndarray  # int64 [B, N]
    images: np.ndarray | None  # float32 [B, 3, S, S], not clamped
    step_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0
    step_logits: list[np.ndarray] | None = None
    fused_seconds: float = 0.0  # backends that run the whole image at once (TensorRT CUDA graph)
    input_seconds: float = 0.0  # host time to draw and write the run's inputs (noise keys, settings)

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
    def max_batch(self) -> int:
        return self.manifest.max_batch

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _labels(self, labels) -> np.ndarray:
        m = self.manifest
        labels = np.asarray(labels)
        if labels.ndim == 1 and labels.size == 0:
            raise ValueError(f"a run takes 1..{m.max_batch} class labels; got none")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D list of integer class ids, got {labels!r}")
        if not 1 <= labels.shape[0] <= m.max_batch:
            raise ValueError(f"a run takes 1..{m.max_batch} class labels (the export's --max-batch); got "
                             f"{labels.shape[0]} (split them, or re-export with --max-batch {max(labels.shape[0], 1)})")
        bad = labels[(labels < 0) | (labels >= m.num_classes)]
        if bad.size:
            raise ValueError(f"class ids {bad.tolist()} are outside [0, {m.num_classes}) for this model")
        return labels.astype(np.int64)

    def run_inputs(self, labels, sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                   seed: int = 0, noise_start: int = 0, keys: np.ndarray | None = None) -> RunInputs:
        """The host inputs of one run: validated labels and settings (one SamplingParams per image, or one
        for all), and the images' noise keys (from ``seed``, image k using stream ``noise_start + k``, or
        given: int32 [b, NOISE_KEYS], e.g. rows of ``restok.noise.noise_keys`` for other seeds)."""
        m = self.manifest
        labels = self._labels(labels)
        b = labels.shape[0]
        params = [sampling] * b if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != b:
            raise ValueError(f"got {len(params)} sampling settings for {b} labels")
        for p in {id(p): p for p in params}.values():
            p.validate()
        if any(p.guided for p in params) and not m.guided:
            raise ArtifactError("these artifacts were exported without guidance (--no-cfg); re-export to use cfg_scale > 1")
        if keys is None:
            keys = noise_keys(check_seed(seed), b, start=check_seed(noise_start, "noise_start"))
        keys = np.asarray(keys)
        if keys.shape != (b, NOISE_KEYS) or not np.issubdtype(keys.dtype, np.integer) or keys.min() < 0 \
                or keys.max() >= NOISE_PRIME:
            raise ValueError(f"noise keys must be integers in [0, {NOISE_PRIME}) of shape [{b}, {NOISE_KEYS}], "
                             f"got {keys.shape}")
        scales = {id(p): p.cfg_scales(self.schedule) for p in params}
        cfg = np.asarray([scales[id(p)] for p in params], dtype=np.float32).T  # [steps, b]
        return RunInputs(labels, keys.astype(np.int32), np.ascontiguousarray(cfg),
                         np.asarray([p.temperature for p in params], np.float32),
                         np.asarray([int(p.top_k) for p in params], np.int64),
                         np.asarray([p.top_p for p in params], np.float32))

    def generate(self, labels, sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 seed: int = 0, noise_start: int = 0, keys: np.ndarray | None = None, decode: bool = True,
                 keep_logits: bool = False, on_step: Callable[[int, Backend], None] | None = None) -> Generation:
        """One run of 1..max_batch images. ``on_step(i, backend)`` is called just before pass i runs, when
        its inputs are in place (``backend.pass_feeds(i)``): calibration records them there."""
        t0 = time.perf_counter()
        run = self.run_inputs(labels, sampling, seed=seed, noise_start=noise_start, keys=keys)
        be = self.backend
        be.set_inputs(run)
        t_in = time.perf_counter() - t0
        b, N = run.batch, self.manifest.num_tokens
        if not keep_logits and on_step is None:
            t0 = time.perf_counter()
            fused = be.run_fused(decode)
            if fused is not None:  # one CUDA-graph replay: no per-pass timings
                return Generation(fused[0], fused[1], [], 0.0, None, fused_seconds=time.perf_counter() - t0,
                                  input_seconds=t_in)
        tokens = np.empty((b, N), dtype=np.int64)
        times, logits = [], [] if keep_logits else None
        for st in self.schedule.steps:
            if on_step is not None:
                on_step(st.index, be)
            t0 = time.perf_counter()
            be.run_pass(st.index)
            times.append(time.perf_counter() - t0)
            tokens[:, st.predicted] = be.pass_tokens(st.index)[:b]
            if keep_logits:
                logits.append(np.array(be.pass_logits(st.index)))
        images, dt = None, 0.0
        if decode:
            t0 = time.perf_counter()
            images = np.array(be.decode(tokens))
            dt = time.perf_counter() - t0
        return Generation(tokens, images, times, dt, logits, input_seconds=t_in)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        m = self.manifest
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != m.num_tokens or not 1 <= tokens.shape[0] <= m.max_batch:
            raise ValueError(f"tokens must have shape [1..{m.max_batch}, {m.num_tokens}], got {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= m.vocab_size:
            raise ValueError(f"token ids must be integers in [0, {m.vocab_size})")
        return np.array(self.backend.decode(tokens.astype(np.int64)))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [b, 3, S, S] with values in [0, 1] -> token ids int64 [b, N]."""
        m = self.manifest
        s = m.image_size
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3, s, s) or not 1 <= images.shape[0] <= m.max_batch:
            raise ValueError(f"images must have shape [1..{m.max_batch}, 3, {s}, {s}], got {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be floats in [0, 1] (divide uint8 pixels by 255), got dtype {images.dtype}")
        if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
            raise ValueError("images must hold finite values in [0, 1] (divide uint8 pixels by 255)")
        return np.array(self.backend.encode(images.astype(np.float32)))
