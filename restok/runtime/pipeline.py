"""The generation pipeline over a backend: the schedule's passes in order, then the tokenizer decoder.

``Pipeline.generate`` takes any number of images and splits them into runs of at most the export's max
batch (``Pipeline.runs`` yields the runs one by one, for progress bars and for jobs that write as they
go). This is the one place that owns the invariant every caller relies on: image k of a call uses noise
stream ``noise_start + k`` of ``seed`` and its own sampling settings, so an image is the same whether it
was generated alone, inside any batch or in any chunk of a longer call, on any backend.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from restok.images import to_uint8
from restok.manifest import ArtifactError, Manifest
from restok.noise import check_keys, noise_keys
from restok.runtime.backend import Backend, create_backend
from restok.runtime.plan import RunInputs
from restok.sampling_params import SamplingParams, batch_settings, check_seed, per_image

__all__ = ["Generation", "Pipeline", "SamplingParams"]


@dataclass
class Generation:
    tokens: np.ndarray  # int64 [B, N]
    images: np.ndarray | None  # float32 [B, 3, S, S], not clamped; or uint8 [B, S, S, 3] (output="uint8")
    step_seconds: list[float] = field(default_factory=list)  # per pass, summed over the runs
    decode_seconds: float = 0.0
    step_logits: list[np.ndarray] | None = None
    fused_seconds: float = 0.0  # backends that run the whole image at once (one CUDA graph)
    input_seconds: float = 0.0  # host time to draw and write the runs' inputs (noise keys, settings)
    runs: int = 1  # backend runs of at most max_batch images

    @property
    def generate_seconds(self) -> float:
        return sum(self.step_seconds) or self.fused_seconds

    @classmethod
    def concat(cls, parts: list["Generation"]) -> "Generation":
        """The runs of one call as one generation."""
        if len(parts) == 1:
            return parts[0]
        steps = [sum(t) for t in zip(*(p.step_seconds for p in parts))] if all(p.step_seconds for p in parts) else []
        images = None if any(p.images is None for p in parts) else np.concatenate([p.images for p in parts])
        return cls(np.concatenate([p.tokens for p in parts]), images, steps, sum(p.decode_seconds for p in parts),
                   None, sum(p.fused_seconds for p in parts), sum(p.input_seconds for p in parts), len(parts))


class Pipeline:
    """Generate images from an artifacts folder with one backend (ONNX Runtime by default).

    One Pipeline may be shared by threads: a run holds the pipeline's lock from its inputs to its copied
    results, so concurrent calls wait for each other (they never share a run's buffers)."""

    def __init__(self, artifacts: str | Path, backend: str | Backend = "onnxruntime", threads: int | None = None,
                 manifest: Manifest | None = None, **backend_options):
        self.folder = Path(artifacts)
        self.manifest = manifest or Manifest.read(self.folder)
        self.schedule = self.manifest.har_schedule()
        self._lock = threading.RLock()
        self._backend: Backend | None = (backend if isinstance(backend, Backend) else
                                         create_backend(backend, self.folder, self.manifest, threads, **backend_options))

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("this Pipeline is closed; make a new one")
        return self._backend

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ inputs
    def _labels(self, labels) -> np.ndarray:
        m = self.manifest
        if isinstance(labels, (str, bytes)):
            raise TypeError(f"labels must be a list of integer class ids, got {labels!r}")
        arr = np.asarray(labels)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"labels must be a non-empty 1-D list of integer class ids, got {labels!r}")
        bad = arr[(arr < 0) | (arr >= m.num_classes)]
        if bad.size:
            raise ValueError(f"class ids {bad.tolist()} are outside [0, {m.num_classes}) for this model")
        return arr.astype(np.int64)

    def _keys(self, n: int, seed: int, noise_start: int, keys) -> np.ndarray | None:
        """Given keys, checked (int32 [n, NOISE_KEYS] in [0, NOISE_PRIME)); None: drawn per run from the seed."""
        check_seed(seed)
        check_seed(noise_start, "noise_start")
        if noise_start + n > 2**63:
            raise ValueError(f"noise_start + images must stay below 2^63, got {noise_start} + {n}")
        return None if keys is None else check_keys(keys, n)

    def _run_inputs(self, labels: np.ndarray, params: list[SamplingParams], keys: np.ndarray) -> RunInputs:
        s = batch_settings(params, self.schedule)
        return RunInputs(labels, keys, s["cfg_scale"], s["temperature"], s["top_k"], s["top_p"])

    # --------------------------------------------------------------- generate
    def runs(self, labels, sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
             seed: int = 0, noise_start: int = 0, keys: np.ndarray | None = None, decode: bool = True,
             output: str = "float", keep_logits: bool = False,
             on_step: Callable[[int, Backend], None] | None = None) -> Iterator[Generation]:
        """The generations of ``labels`` in runs of at most max_batch images, in order. Image k of the call uses noise stream ``noise_start + k`` of ``seed``
        (or row k of ``keys``, int32 [n, NOISE_KEYS]) and ``sampling`` (one SamplingParams for all, or one
        per image). ``output``: images as float32 [n, 3, S, S] (not clamped), or "uint8" [n, S, S, 3] as
        ``restok.images.to_uint8`` makes them (on the device where the backend can: a quarter of the bytes).
        ``on_step(i, backend)`` is called just before pass i of each run, when its inputs are in place
        (``backend.pass_feeds(i)``); ``keep_logits`` keeps every pass's logits (one run only).
        Everything is checked here, before the iterator runs anything."""
        labels = self._labels(labels)
        n = labels.shape[0]
        params = per_image(sampling, n)
        given = self._keys(n, seed, noise_start, keys)
        if any(p.guided for p in params) and not self.manifest.guided:
            raise ArtifactError("these artifacts were exported without guidance (--no-cfg); re-export to use cfg_scale > 1")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if keep_logits and n > self.max_batch:
            raise ValueError(f"keep_logits keeps one run's logits: at most {self.max_batch} images, got {n}")

        def each_run() -> Iterator[Generation]:
            for start in range(0, n, self.max_batch):
                end = min(n, start + self.max_batch)
                t0 = time.perf_counter()
                k = given[start:end] if given is not None else noise_keys(seed, end - start, start=noise_start + start)
                run = self._run_inputs(labels[start:end], params[start:end], k)
                yield self._run(run, time.perf_counter() - t0, decode, output, keep_logits, on_step)

        return each_run()

    def generate(self, labels, sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
                 seed: int = 0, noise_start: int = 0, keys: np.ndarray | None = None, decode: bool = True,
                 output: str = "float", keep_logits: bool = False,
                 on_step: Callable[[int, Backend], None] | None = None) -> Generation:
        """Any number of images (``runs``, joined): tokens int64 [n, N] and images [n, ...]."""
        return Generation.concat(list(self.runs(labels, sampling, seed=seed, noise_start=noise_start, keys=keys,
                                                decode=decode, output=output, keep_logits=keep_logits,
                                                on_step=on_step)))

    def _run(self, run: RunInputs, t_keys: float, decode: bool, output: str, keep_logits: bool,
             on_step: Callable[[int, Backend], None] | None) -> Generation:
        """One backend run of at most max_batch images; results are copies (the buffers serve the next run)."""
        with self._lock:
            be = self.backend
            t0 = time.perf_counter()
            be.set_inputs(run)
            t_in = t_keys + time.perf_counter() - t0
            b, N = run.batch, self.manifest.num_tokens
            if not keep_logits and on_step is None:
                t0 = time.perf_counter()
                fused = be.run_fused(decode, output)
                if fused is not None:  # one CUDA-graph replay: no per-pass timings
                    tokens, images = fused
                    return Generation(np.array(tokens), None if images is None else np.array(images), [], 0.0, None,
                                      fused_seconds=time.perf_counter() - t0, input_seconds=t_in)
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
                if output == "uint8":
                    images = to_uint8(images)
                dt = time.perf_counter() - t0
            return Generation(tokens, images, times, dt, logits, input_seconds=t_in)

    # ---------------------------------------------------------------- tokenizer
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids int64 [n, N] (any n) -> images float32 [n, 3, S, S]."""
        m = self.manifest
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != m.num_tokens or tokens.shape[0] < 1:
            raise ValueError(f"tokens must have shape [n, {m.num_tokens}], got {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= m.vocab_size:
            raise ValueError(f"token ids must be integers in [0, {m.vocab_size})")
        return self._chunked(self.backend.decode, tokens.astype(np.int64))

    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, 3, S, S] (any n) with values in [0, 1] -> token ids int64 [n, N]."""
        m = self.manifest
        s = m.image_size
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3, s, s) or images.shape[0] < 1:
            raise ValueError(f"images must have shape [n, 3, {s}, {s}], got {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be floats in [0, 1] (divide uint8 pixels by 255), got dtype {images.dtype}")
        if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
            raise ValueError("images must hold finite values in [0, 1] (divide uint8 pixels by 255)")
        return self._chunked(self.backend.encode, images.astype(np.float32))

    def _chunked(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, x.shape[0], self.max_batch):
            with self._lock:
                out.append(np.array(fn(x[start : start + self.max_batch])))
        return np.concatenate(out)
