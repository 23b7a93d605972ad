"""ONNX Runtime backend: the embedded default (CPU), the parity stand-in for TensorRT.

One InferenceSession per graph: the generator's weights are loaded and pre-packed for ONNX Runtime's GEMM
kernels once, whatever the pass or the batch. Buffers come from the binding plan, allocated once; for each
batch size the nine passes' IOBindings (OrtValues over prefixes of those buffers) are made on first use
and reused, so a run copies nothing but its host inputs and the previous pass's tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import HostBackend


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("onnxruntime is not installed: pip install onnxruntime") from e
    return onnxruntime


class OnnxRuntimeBackend(HostBackend):
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None, **_):
        super().__init__(folder, manifest, threads)
        self.ort = _ort()
        self.providers = providers or ["CPUExecutionProvider"]
        # the encoder is loaded on first use: generation never needs it (GPT-L's tokenizer encoder is ~1.2 GB)
        self.sessions = {name: self._session(g.file) for name, g in manifest.graphs.items() if name != "encoder"}
        self._bindings: dict[int, list] = {}  # batch -> one IOBinding per pass
        self._dec_bindings: dict[int, object] = {}
        self._values: dict[tuple, tuple] = {}  # (buffer, shape) -> (OrtValue, the numpy view it wraps)

    def _session(self, rel: str):
        ort = self.ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads or os.cpu_count() or 1
        so.inter_op_num_threads = 1
        # the generator and the decoder alternate: a finished session's spinning threads would steal the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        path = self.folder / rel
        try:
            return ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # a damaged graph that passed the size check, or an unsupported op
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e

    def _value(self, key: str, shape: tuple[int, ...]):
        """One OrtValue per buffer prefix: an in-place cache binds the very same value as input and output."""
        if (key, shape) not in self._values:
            arr = self.view(key, shape)
            self._values[(key, shape)] = (self.ort.OrtValue.ortvalue_from_numpy(arr), arr)
        return self._values[(key, shape)][0]

    def _pass_bindings(self, batch: int) -> list:
        if batch not in self._bindings:
            sess = self.sessions["generator"]
            out = []
            for p in self.plan.passes:
                b = sess.io_binding()
                for bd in p.inputs:
                    b.bind_ortvalue_input(bd.tensor.name, self._value(bd.buffer, self.plan.shape(bd, batch, p)))
                for bd in p.outputs:
                    b.bind_ortvalue_output(bd.tensor.name, self._value(bd.buffer, self.plan.shape(bd, batch, p)))
                out.append(b)
            self._bindings[batch] = out
        return self._bindings[batch]

    def run_pass(self, i: int) -> None:
        self.sessions["generator"].run_with_iobinding(self._pass_bindings(self.batch)[i])
        self._chain_tokens(i)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        b = tokens.shape[0]
        self.plan.check_batch(b)
        (tin,), (tout,) = self.plan.decoder
        if b not in self._dec_bindings:
            bind = self.sessions["decoder"].io_binding()
            bind.bind_ortvalue_input(tin.tensor.name, self._value(tin.buffer, self.plan.shape(tin, b)))
            bind.bind_ortvalue_output(tout.tensor.name, self._value(tout.buffer, self.plan.shape(tout, b)))
            self._dec_bindings[b] = bind
        self.view(tin.buffer, self.plan.shape(tin, b))[...] = tokens
        self.sessions["decoder"].run_with_iobinding(self._dec_bindings[b])
        return self.view(tout.buffer, self.plan.shape(tout, b))

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name not in self.sessions and name in self.manifest.graphs:
            self.sessions[name] = self._session(self.manifest.graphs[name].file)
        sess = self.sessions[name]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))

    def close(self) -> None:
        self._bindings.clear()
        self._dec_bindings.clear()
        self._values.clear()
        self.sessions.clear()
