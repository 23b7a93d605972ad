"""ONNX Runtime backend: the embedded default (CPU), the parity stand-in for TensorRT.

One InferenceSession per graph, all buffers allocated once and bound with IOBinding: step i's
``next_tokens`` and ``present_*`` outputs are the very buffers bound as step i+1's ``tokens`` and
``past_*`` inputs, so nothing is copied between passes.

Memory: by default each session pre-packs its weights for ONNX Runtime's GEMM kernels (fast, but one
copy per pass: about 1.2 GB per pass for fp32 GPT-L). ``low_memory=True`` instead memory-maps the shared
``weights.bin`` once and hands it to every session without pre-packing: a few MB per session, measured
about 2-3x slower on the small passes (ONNX Runtime then packs the weights at every call).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import Backend

_NP = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
       "int8": np.int8, "bool": np.bool_}


def _np_dtype(name: str):
    if name in _NP:
        return np.dtype(_NP[name])
    if name == "float8e4m3fn":
        try:
            import ml_dtypes
        except ImportError as e:
            raise ImportError("fp8 weights in low-memory mode need the ml_dtypes package (pip install ml_dtypes)") from e
        return np.dtype(ml_dtypes.float8_e4m3fn)
    raise ArtifactError(f"unknown tensor type {name!r} in the manifest; re-export with this restok")


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("onnxruntime is not installed: pip install onnxruntime") from e
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, low_memory: bool = False,
                 providers: list[str] | None = None, **_):
        super().__init__(folder, manifest, threads)
        ort = _ort()
        self.ort = ort
        self.providers = providers or ["CPUExecutionProvider"]
        self.low_memory = low_memory
        self._shared = self._map_weights() if low_memory else {}
        self.sessions = {}
        for name, g in manifest.graphs.items():
            self.sessions[name] = self._session(g.file)
        m = manifest
        self.num_steps = m.num_steps
        # ---- buffers, allocated once
        self.buf: dict[str, np.ndarray] = {}
        self.vals: dict[str, object] = {}
        self.labels = self._alloc("labels", (m.rows,), np.int64)
        self.noise = [self._alloc(f"noise{i}", m.step_graph(i).input("noise").shape, np.float32) for i in range(self.num_steps)]
        self.cfg = [self._alloc(f"cfg{i}", (1,), np.float32) for i in range(self.num_steps)]
        self.temperature = self._alloc("temperature", (1,), np.float32)
        self.top_k = self._alloc("top_k", (1,), np.int64)
        self.top_p = self._alloc("top_p", (1,), np.float32)
        self.bindings = []
        self.input_sources: list[list[tuple[str, str]]] = []  # per step: (input name, buffer key)
        inplace = m.kv_cache == "inplace"
        if inplace:  # one cache buffer per layer and k/v, bound as input and output of every pass
            for t in m.step_graph(0).inputs:
                if t.name.startswith("cache_"):
                    self._alloc(t.name, t.shape, _NP[t.dtype])
        for i in range(self.num_steps):
            g = m.step_graph(i)
            outs = {t.name: self._alloc(f"s{i}.{t.name}", t.shape, _NP[t.dtype]) for t in g.outputs
                    if not t.name.startswith("cache_")}
            b = self.sessions[g.name].io_binding()
            sources = []
            for t in g.inputs:
                if t.name == "labels":
                    src = "labels"
                elif t.name == "tokens":
                    src = f"s{i - 1}.next_tokens"
                elif t.name.startswith("past_"):
                    src = f"s{i - 1}.present_" + t.name[len("past_"):]
                elif t.name == "noise":
                    src = f"noise{i}"
                elif t.name == "cfg_scale":
                    src = f"cfg{i}"
                else:
                    src = t.name
                have = self.buf[src]
                if tuple(have.shape) != t.shape or have.dtype != _NP[t.dtype]:
                    raise ArtifactError(
                        f"step{i} input {t.name} {t.shape} {t.dtype} does not match {src} "
                        f"{tuple(have.shape)} {have.dtype}; the artifacts are inconsistent, re-export them"
                    )
                b.bind_ortvalue_input(t.name, self.vals[src])
                sources.append((t.name, src))
            self.input_sources.append(sources)
            for name in outs:
                b.bind_ortvalue_output(name, self.vals[f"s{i}.{name}"])
            for t in g.outputs:
                if t.name.startswith("cache_"):  # cache_key_out_3 -> the cache_key_3 buffer: in place
                    b.bind_ortvalue_output(t.name, self.vals[t.name.replace("_out_", "_")])
            self.bindings.append(b)
        # decoder / encoder
        dec = m.graphs["decoder"]
        self.dec_in = self._alloc("decoder.tokens", dec.input("tokens").shape, np.int64)
        self.dec_out = self._alloc("decoder.images", dec.output("images").shape, np.float32)
        self.dec_binding = self.sessions["decoder"].io_binding()
        self.dec_binding.bind_ortvalue_input("tokens", self.vals["decoder.tokens"])
        self.dec_binding.bind_ortvalue_output("images", self.vals["decoder.images"])

    # ------------------------------------------------------------------ setup
    def _alloc(self, key: str, shape, dtype) -> np.ndarray:
        arr = np.zeros(tuple(shape), dtype=dtype)
        self.buf[key] = arr
        self.vals[key] = self.ort.OrtValue.ortvalue_from_numpy(arr)
        return arr

    def _map_weights(self) -> dict[str, dict[str, object]]:
        """{weights file: {tensor name: OrtValue over a read-only memory map}}."""
        shared = {}
        for rel, index in self.manifest.weights.items():
            path = self.folder / rel
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            vals = {}
            for name, info in index.items():
                dt = _np_dtype(info["dtype"])
                n = int(np.prod(info["shape"], dtype=np.int64)) * dt.itemsize
                off = int(info["offset"])
                if off + n > mm.size:
                    raise ArtifactError(f"{path} is shorter than the manifest says (tensor {name}); re-export the artifacts")
                arr = mm[off : off + n].view(dt).reshape(info["shape"])
                vals[name] = self.ort.OrtValue.ortvalue_from_numpy(arr)
            shared[rel] = vals
        return shared

    def _session(self, rel: str):
        ort = self.ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads or os.cpu_count() or 1
        so.inter_op_num_threads = 1
        # passes alternate between sessions: a finished session's spinning threads would steal the cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        if self.low_memory:
            so.add_session_config_entry("session.disable_prepacking", "1")
        folder = str(Path(rel).parent)
        for wrel, vals in self._shared.items():
            if str(Path(wrel).parent) == folder:
                for name, v in vals.items():
                    so.add_initializer(name, v)
        path = self.folder / rel
        try:
            return ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # a damaged graph that passed the size check, or an unsupported op
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {e}") from e

    # ------------------------------------------------------------------- run
    def set_inputs(self, labels, noise, cfg_scales, temperature, top_k, top_p) -> None:
        self.labels[...] = labels
        for i, st in enumerate(self.manifest.har_schedule().steps):
            self.noise[i][...] = noise[:, st.predicts[0] : st.predicts[-1] + 1]
            self.cfg[i][0] = cfg_scales[i]
        self.temperature[0], self.top_k[0], self.top_p[0] = temperature, top_k, top_p

    def run_step(self, i: int) -> None:
        self.sessions[f"step{i}"].run_with_iobinding(self.bindings[i])

    def step_tokens(self, i: int) -> np.ndarray:
        return self.buf[f"s{i}.next_tokens"]

    def step_feeds(self, i: int) -> dict[str, np.ndarray]:
        """Copies of pass i's current inputs (valid after run_step(i-1)): calibration and parity traces."""
        srcs = self.input_sources[i]
        return {name: np.array(self.buf[key]) for name, key in srcs}

    def step_logits(self, i: int) -> np.ndarray:
        return self.buf[f"s{i}.logits"]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        self.dec_in[...] = tokens
        self.sessions["decoder"].run_with_iobinding(self.dec_binding)
        return self.dec_out

    def encode(self, images: np.ndarray) -> np.ndarray:
        if "encoder" not in self.sessions:
            return super().encode(images)
        out = self.sessions["encoder"].run(["tokens"], {"images": np.ascontiguousarray(images, dtype=np.float32)})
        return out[0]

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on explicit inputs (parity checks feed recorded inputs step by step)."""
        sess = self.sessions[name]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))

    def close(self) -> None:
        self.bindings.clear()
        self.sessions.clear()
