"""The interface every runtime backend implements, the registry of backends, and the host-memory base that
the ONNX Runtime and PyTorch backends share.

A backend owns the buffers of one artifacts folder, allocated once from the binding plan
(``restok.runtime.plan``) for the export's max batch, and runs pass i / the decoder / the encoder on a
prefix of them for a run of 1..max_batch images. The pipeline (``restok.runtime.pipeline``), parity checks
and calibration use only the methods declared here: they never see a framework type.
"""

from __future__ import annotations

import abc
import inspect
import numbers
from importlib import import_module
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.plan import CONSTANT, BindingPlan, PassPlan, RunInputs

BACKENDS = {
    "onnxruntime": "restok.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "torch": "restok.runtime.torch_backend:TorchBackend",
    "tensorrt": "restok.tensorrt.backend:TensorRTBackend",
    "openvino": "restok.runtime.openvino_backend:OpenVINOBackend",
    "cuda": "restok.runtime.cuda_backend:CudaBackend",
}


class Backend(abc.ABC):
    """Runs the graphs of one artifacts folder. Buffers are allocated in ``__init__`` and reused."""

    name: str = "?"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.threads = threads
        self.plan = self.binding_plan(manifest)
        self.batch = 0  # images in the current run (set_inputs)

    def binding_plan(self, manifest: Manifest) -> BindingPlan:
        """The plan this backend allocates and binds: the export's graphs' (a backend that runs something
        else, such as the CUDA backend's modules, says which)."""
        return BindingPlan(manifest)

    @abc.abstractmethod
    def set_inputs(self, run: RunInputs) -> None:
        """Write one run's host inputs (labels, noise keys, per-image sampling parameters) into the buffers."""

    @abc.abstractmethod
    def run_pass(self, i: int) -> None:
        """Run pass i of the current run; its next_tokens reach pass i+1's tokens input and its KV cache
        output is pass i+1's KV input, without a round trip through the caller."""

    @abc.abstractmethod
    def pass_tokens(self, i: int) -> np.ndarray:
        """int64 [rows, n]: the tokens sampled by pass i (valid after run_pass(i))."""

    @abc.abstractmethod
    def pass_logits(self, i: int) -> np.ndarray:
        """float32 [rows, n, V]: the raw logits of pass i (valid after run_pass(i), until the next pass)."""

    @abc.abstractmethod
    def pass_feeds(self, i: int) -> dict[str, np.ndarray]:
        """Copies of pass i's inputs, by graph input name (valid before run_pass(i)): calibration traces and
        parity checks feed them to other backends."""

    @abc.abstractmethod
    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph (generator, decoder, encoder) on explicit inputs -> every output, by name."""

    @abc.abstractmethod
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [b, N] -> float32 [b, 3, S, S]."""

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self.manifest.graphs

    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [b, 3, S, S] in [0, 1] -> int64 [b, N]."""
        if "encoder" not in self.manifest.graphs:
            raise ArtifactError("these artifacts have no encoder graph (exported with --no-encoder); re-export "
                                "without it to encode images")
        return self.run_graph("encoder", {"images": np.ascontiguousarray(images, dtype=np.float32)})["tokens"]

    def run_fused(self, decode: bool = True, output: str = "float") -> tuple[np.ndarray, np.ndarray | None] | None:
        """Run every pass (and the decoder) in one go -> (tokens [b, N], images or None), or None when the
        backend runs pass by pass (then the pipeline calls run_pass). ``output``: images as float32
        [b, 3, S, S], or "uint8" [b, S, S, 3] as ``restok.images.to_uint8`` makes them."""
        return None

    def close(self) -> None:
        """Release sessions and buffers; calling it again does nothing."""


class HostBackend(Backend):
    """Backends whose buffers live in host memory as numpy arrays (ONNX Runtime on the CPU, the PyTorch
    reference). Every binding is a C-contiguous prefix view of its buffer."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        plan = self.plan
        # zeros: the in-place KV cache is read (masked) before it is written; garbage could be NaN
        self.buf = {k: np.zeros(b.shape, dtype=self._buffer_dtype(b.dtype)) for k, b in plan.buffers.items()}
        for key, value in plan.constants().items():
            self.buf[key][...] = value
        assert all(b.kind != CONSTANT or b.key in plan.constants() for b in plan.buffers.values())

    def _buffer_dtype(self, dtype: np.dtype) -> np.dtype:
        return dtype

    def view(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The prefix of buffer ``key`` as a C-contiguous array of ``shape``."""
        n = int(np.prod(shape, dtype=np.int64))
        return self.buf[key].reshape(-1)[:n].reshape(shape)

    def _pass_views(self, p: PassPlan, outputs: bool) -> dict[str, np.ndarray]:
        return {bd.tensor.name: self.view(bd.buffer, self.plan.shape(bd, self.batch, p))
                for bd in (p.outputs if outputs else p.inputs)}

    def set_inputs(self, run: RunInputs) -> None:
        self.plan.check_batch(run.batch)
        self.batch = run.batch
        for key, value in self.plan.host_values(run).items():
            self.view(key, value.shape)[...] = value

    def _chain_tokens(self, i: int) -> None:
        """pass i's next_tokens -> the first columns of pass i+1's tokens."""
        if i + 1 >= len(self.plan.passes):
            return
        nxt = self.plan.passes[i + 1]
        rows = self.manifest.rows(self.batch)
        src = self.view(nxt.tokens_from, (rows, nxt.tokens_width))
        dst_b = next(bd for bd in nxt.inputs if bd.tensor.role == "tokens")
        self.view(dst_b.buffer, self.plan.shape(dst_b, self.batch, nxt))[:, : nxt.tokens_width] = src

    def pass_tokens(self, i: int) -> np.ndarray:
        p = self.plan.passes[i]
        bd = next(b for b in p.outputs if b.tensor.role == "next_tokens")
        return self.view(bd.buffer, self.plan.shape(bd, self.batch, p))

    def pass_logits(self, i: int) -> np.ndarray:
        p = self.plan.passes[i]
        bd = next(b for b in p.outputs if b.tensor.role == "logits")
        return self.view(bd.buffer, self.plan.shape(bd, self.batch, p))

    def pass_feeds(self, i: int) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._pass_views(self.plan.passes[i], outputs=False).items()}


def backend_names() -> list[str]:
    return list(BACKENDS)


def create_backend(name: str, folder: Path, manifest: Manifest, threads: int | None = None, **options) -> Backend:
    """``options`` go to the backend (torch: device)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (all cores), got {threads!r}")
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        mod = import_module(module)
    except ImportError as e:
        raise ImportError(f"the {name} backend is not available here: {e}") from e
    backend_cls = getattr(mod, cls)
    takes = [p.name for p in inspect.signature(backend_cls.__init__).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "folder", "manifest", "threads")]
    unknown = sorted(set(options) - set(takes))
    if unknown:  # an option the backend would ignore is an error, not a silent default
        raise TypeError(f"the {name} backend takes no option {unknown[0]!r} (its options: {', '.join(takes) or 'none'})")
    return backend_cls(folder, manifest, threads, **options)
