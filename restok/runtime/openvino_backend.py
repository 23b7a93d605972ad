"""OpenVINO backend (CPU): the same exported graphs on Intel's runtime, with bf16 compute on CPUs that have it.

The ``openvino`` package's Python API reads the export's ONNX files (not the ONNX Runtime OpenVINO provider,
which cannot be installed beside ``onnxruntime``). Buffers and bindings come from the binding plan like
every backend's: for each batch size, each pass's inputs and outputs are OpenVINO tensors over prefixes of
the plan's numpy buffers (no copies; set once and reused). ``compute_precision``: ``fp32``, ``bf16`` (the
CPU's bf16 units: AVX-512 BF16 or AMX) or ``auto`` (bf16 where the CPU has it); Q/DQ artifacts from
``restok calibrate`` run as int8 whatever it says. An in-place KV-cache export runs its past/present
fallback graph (OpenVINO's ONNX frontend has no TensorScatter).

bf16 is not exact: ``restok check --backend openvino`` gates it against the float32 reference (95% of
sampled tokens, decoder PSNR 40 dB) and ``restok generate --backend auto`` uses it only where it passes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import HostBackend

COMPUTE_PRECISIONS = ("auto", "fp32", "bf16")


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise ImportError("the openvino backend needs OpenVINO: pip install 'restok[openvino]'") from e
    return openvino


def cpu_has_bf16() -> bool:
    try:
        return "BF16" in _ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except (ImportError, RuntimeError):
        return False


class OpenVINOBackend(HostBackend):
    name = "openvino"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, compute_precision: str = "auto",
                 **_):
        if manifest.precision == "int8-dynamic":
            raise ArtifactError("int8-dynamic artifacts use ONNX Runtime's DynamicQuantizeMatMul, which OpenVINO "
                                "cannot read; use the fp32 export (with --compute-precision bf16) or int8 Q/DQ artifacts")
        if manifest.kv_cache == "inplace":
            manifest = manifest.kv_cache_view("concat")  # refuses an in-place export without its fallback
        super().__init__(folder, manifest, threads)
        if compute_precision not in COMPUTE_PRECISIONS:
            raise ValueError(f"compute precision must be one of {', '.join(COMPUTE_PRECISIONS)}, got {compute_precision!r}")
        ov = _ov()
        self.ov = ov
        self.core = ov.Core()
        if compute_precision == "auto":
            compute_precision = "bf16" if cpu_has_bf16() else "fp32"
        if compute_precision == "bf16" and not cpu_has_bf16():
            raise ImportError("--compute-precision bf16: this CPU has no bf16 instructions (AVX-512 BF16 or AMX); use fp32")
        self.compute_precision = compute_precision
        self.precision = manifest.precision if manifest.precision != "fp32" else compute_precision
        # CPU_RUNTIME_CACHE_CAPACITY 0: with OpenVINO 2026.4's shape-keyed executor cache, the generator's
        # passes run in schedule order gave wrong logits from the 8-position pass on (max error ~20, measured;
        # each pass alone was right); without the cache every pass matches ONNX Runtime to 1e-5
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if compute_precision == "bf16" else "f32",
                       "INFERENCE_NUM_THREADS": int(self.threads or os.cpu_count() or 1),
                       "PERFORMANCE_HINT": "LATENCY", "CPU_RUNTIME_CACHE_CAPACITY": 0}
        self.compiled = {name: self._compile(g.file) for name, g in manifest.graphs.items() if name != "encoder"}
        self.requests = {name: c.create_infer_request() for name, c in self.compiled.items()}
        self._current: dict[str, tuple] = {}  # graph -> (batch, pass) its request is bound for
        self._alive: dict[str, list] = {}  # the tensors a request holds (numpy memory they share)

    def _compile(self, rel: str):
        path = self.folder / rel
        try:
            return self.core.compile_model(self.core.read_model(str(path)), "CPU", self.config)
        except Exception as e:  # a graph OpenVINO cannot read or compile
            raise ArtifactError(f"OpenVINO cannot load {path}: {e}") from e

    def _tensor(self, arr: np.ndarray):
        return self.ov.Tensor(arr, shared_memory=True)

    def _bind(self, graph: str, batch: int, i: int | None, views_in: dict, views_out: dict) -> None:
        """Point the graph's request at this pass's buffer prefixes (outputs too: no copies)."""
        if self._current.get(graph) == (batch, i):
            return
        req = self.requests[graph]
        tensors = []
        for name, arr in (*views_in.items(), *views_out.items()):
            t = self._tensor(arr)
            req.set_tensor(name, t)
            tensors.append(t)
        self._alive[graph] = tensors
        self._current[graph] = (batch, i)

    def run_pass(self, i: int) -> None:
        p = self.plan.passes[i]
        self._bind("generator", self.batch, i, self._pass_views(p, False), self._pass_views(p, True))
        self.requests["generator"].infer()
        self._chain_tokens(i)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        b = tokens.shape[0]
        self.plan.check_batch(b)
        (tin,), (tout,) = self.plan.decoder
        vin, vout = self.view(tin.buffer, self.plan.shape(tin, b)), self.view(tout.buffer, self.plan.shape(tout, b))
        vin[...] = tokens
        self._bind("decoder", b, None, {tin.tensor.name: vin}, {tout.tensor.name: vout})
        self.requests["decoder"].infer()
        return vout

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name not in self.compiled:
            self.compiled[name] = self._compile(self.manifest.graphs[name].file)
        res = self.compiled[name].create_infer_request().infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        return {out.get_any_name(): np.array(v) for out, v in res.items()}

    def close(self) -> None:
        self._current.clear()
        self._alive.clear()
        self.requests.clear()
        self.compiled.clear()
