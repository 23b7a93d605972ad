"""TensorRT backend: tensorrt + cuda-python + numpy, no torch.

Every device buffer is allocated once; each step engine gets its own execution context, all contexts share
one scratch allocation (the passes run one after another on one stream), and tensor addresses are set once:
step i's ``next_tokens`` and ``present_*`` buffers are step i+1's ``tokens`` and ``past_*``. After a
warm-up, the whole image (input copies, the nine passes, the gather of the sampled tokens, the decoder, the
output copies) is captured into one CUDA graph and replayed per batch. Every CUDA and TensorRT call's
status is checked.

Written against TensorRT 10.x/11.x's documented Python API and cuda-python's runtime bindings; it has not
run on a GPU in this repository's CI (see scripts/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from restok.manifest import Manifest
from restok.runtime.backend import Backend


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6 layout
    return cudart


class CudaError(RuntimeError):
    pass


class _Cuda:
    """Checked cuda-python runtime calls."""

    def __init__(self):
        self.rt = _cudart()

    def __call__(self, fn: str, *args):
        res = getattr(self.rt, fn)(*args)
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if "MemoryAllocation" in name:
                raise MemoryError(f"the GPU ran out of memory in {fn}; use a smaller batch, fp16/int8 engines, "
                                  "or free the device") from None
            raise CudaError(f"{fn} failed: {name}")
        return rest[0] if len(rest) == 1 else rest


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, **_):
        from restok.engines.builder import check_engines, gpu_identity, import_tensorrt, tensorrt_manifest

        trt = import_tensorrt()
        manifest = tensorrt_manifest(manifest, trt.__version__)  # the past/present set on TensorRT < 10.15
        super().__init__(folder, manifest, threads)
        self.trt = trt
        self.cuda = _Cuda()
        cu = self.cuda
        self.engine_dir = check_engines(self.folder, manifest, trt.__version__, gpu_identity())
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for name in manifest.graphs:
            plan = (self.engine_dir / f"{name}.plan").read_bytes()
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise CudaError(f"TensorRT could not deserialize {name}.plan; rebuild with restok build")
            self.engines[name] = engine
        self.stream = cu("cudaStreamCreate")
        # one scratch allocation shared by every context (they never run concurrently)
        scratch = max(self._device_memory(e) for e in self.engines.values())
        self.scratch = cu("cudaMalloc", max(scratch, 1))
        for name, e in self.engines.items():
            ctx = e.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise CudaError(f"TensorRT could not create an execution context for {name}")
            ctx.set_device_memory(self.scratch, scratch)
            self.contexts[name] = ctx
        m = manifest
        self.sched = m.har_schedule()
        self.dev: dict[str, int] = {}  # buffer key -> device pointer
        self.host: dict[str, np.ndarray] = {}  # pinned host mirrors of what crosses PCIe
        self.shapes: dict[str, tuple] = {}
        B, N = m.batch, m.num_tokens
        self._pinned("labels", (m.rows,), np.int64)
        for i in range(m.num_steps):
            self._pinned(f"noise{i}", m.step_graph(i).input("noise").shape, np.float32)
            self._pinned(f"cfg{i}", (1,), np.float32)
        self._pinned("temperature", (1,), np.float32)
        self._pinned("top_k", (1,), np.int64)
        self._pinned("top_p", (1,), np.float32)
        if m.kv_cache == "inplace":  # one buffer per cache, input and output of every pass: updated in place
            for t in m.step_graph(0).inputs:
                if t.name.startswith("cache_"):
                    self._device(t.name, t.shape, np.dtype(t.dtype))
        for i in range(m.num_steps):
            g = m.step_graph(i)
            engine = self.engines[g.name]
            for t in g.outputs:
                if not t.name.startswith("cache_"):
                    self._device(f"s{i}.{t.name}", t.shape, np.dtype(t.dtype))
            ctx = self.contexts[g.name]
            for t in g.inputs:
                self._bind(ctx, t.name, self._source(i, t.name))
            for t in g.outputs:
                if t.name.startswith("cache_"):
                    src = t.name.replace("_out_", "_")
                    aliased = getattr(engine, "get_aliased_input_tensor", None)
                    if aliased is not None and aliased(t.name) != src:
                        raise CudaError(f"{g.name}: TensorRT did not alias {t.name} to {src} (got {aliased(t.name)!r}); "
                                        "the in-place KV-cache update needs TensorRT >= 10.15")
                    self._bind(ctx, t.name, src)
                else:
                    self._bind(ctx, t.name, f"s{i}.{t.name}")
        self._pinned("tokens", (B, N), np.int64)  # the decoder's input, gathered on the device
        dec = m.graphs["decoder"]
        self._pinned("images", dec.output("images").shape, np.float32)
        self._bind(self.contexts["decoder"], "tokens", "tokens")
        self._bind(self.contexts["decoder"], "images", "images")
        self.graph_exec: dict[bool, object] = {}  # decode -> instantiated CUDA graph
        self._logits_host: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _source(i: int, name: str) -> str:
        """The buffer bound to input ``name`` of pass i."""
        if name == "tokens":
            return f"s{i - 1}.next_tokens"
        if name.startswith("past_"):
            return f"s{i - 1}.present_" + name[len("past_"):]
        return {"labels": "labels", "noise": f"noise{i}", "cfg_scale": f"cfg{i}"}.get(name, name)

    def _device_memory(self, engine) -> int:
        v = getattr(engine, "device_memory_size_v2", None)  # TensorRT 11 has only the _v2 form
        return int(v if v is not None else engine.device_memory_size)

    def _device(self, key: str, shape, dtype) -> int:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        self.dev[key] = self.cuda("cudaMalloc", nbytes)
        self.shapes[key] = (tuple(shape), np.dtype(dtype))
        return self.dev[key]

    def _pinned(self, key: str, shape, dtype) -> np.ndarray:
        self._device(key, shape, dtype)
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        ptr = self.cuda("cudaMallocHost", nbytes)
        buf = (ctypes.c_byte * nbytes).from_address(int(ptr))
        arr = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        self.host[key] = arr
        return arr

    def _bind(self, ctx, tensor: str, key: str) -> None:
        if not ctx.set_tensor_address(tensor, int(self.dev[key])):
            raise CudaError(f"set_tensor_address({tensor}) failed")

    def _h2d(self, key: str) -> None:
        a = self.host[key]
        self.cuda("cudaMemcpyAsync", self.dev[key], a.ctypes.data, a.nbytes,
                  self.cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)

    def _d2h(self, key: str) -> None:
        a = self.host[key]
        self.cuda("cudaMemcpyAsync", a.ctypes.data, self.dev[key], a.nbytes,
                  self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)

    def _inputs_to_device(self) -> None:
        for key in ("labels", "temperature", "top_k", "top_p", *[f"noise{i}" for i in range(self.manifest.num_steps)],
                    *[f"cfg{i}" for i in range(self.manifest.num_steps)]):
            self._h2d(key)

    def _execute(self, name: str) -> None:
        if not self.contexts[name].execute_async_v3(int(self.stream)):
            raise CudaError(f"TensorRT execute_async_v3 failed for {name}")

    def _gather_tokens(self) -> None:
        """tokens[:, predicts of step i] = next_tokens_i[:B] for every step (2D device copies)."""
        B = self.manifest.batch
        for st in self.sched.steps:
            n = st.num_new
            self.cuda("cudaMemcpy2DAsync", self.dev["tokens"] + 8 * st.predicts[0], 8 * self.manifest.num_tokens,
                      self.dev[f"s{st.index}.next_tokens"], 8 * n, 8 * n, B,
                      self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream)

    def _enqueue_all(self, decode: bool) -> None:
        self._inputs_to_device()
        for i in range(self.manifest.num_steps):
            self._execute(f"step{i}")
        self._gather_tokens()
        if decode:
            self._execute("decoder")
            self._d2h("images")
        self._d2h("tokens")

    def _sync(self) -> None:
        self.cuda("cudaStreamSynchronize", self.stream)

    def capture(self, decode: bool = True) -> None:
        """Warm up once, then capture the whole image (with or without decoding) into one CUDA graph."""
        self._enqueue_all(decode=decode)
        self._sync()
        rt = self.cuda.rt
        self.cuda("cudaStreamBeginCapture", self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            self._enqueue_all(decode=decode)
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(self.stream)  # unchecked: the capture is void, report the cause
            if int(err) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = self.cuda("cudaStreamEndCapture", self.stream)
        try:
            self.graph_exec[decode] = self.cuda("cudaGraphInstantiate", graph, 0)
        finally:
            self.cuda("cudaGraphDestroy", graph)

    # ------------------------------------------------------------------- run
    def set_inputs(self, labels, noise, cfg_scales, temperature, top_k, top_p) -> None:
        self.host["labels"][...] = labels
        for i, st in enumerate(self.sched.steps):
            self.host[f"noise{i}"][...] = noise[:, st.predicts[0] : st.predicts[-1] + 1]
            self.host[f"cfg{i}"][0] = cfg_scales[i]
        self.host["temperature"][0], self.host["top_k"][0], self.host["top_p"][0] = temperature, top_k, top_p
        self._inputs_to_device()

    def run_step(self, i: int) -> None:
        self._execute(f"step{i}")
        self._sync()

    def run_fused(self, decode: bool = True):
        """The whole image as one CUDA-graph replay -> (tokens [B, N], images or None)."""
        if decode not in self.graph_exec:
            self.capture(decode)
        self.cuda("cudaGraphLaunch", self.graph_exec[decode], self.stream)
        self._sync()
        return np.array(self.host["tokens"]), (np.array(self.host["images"]) if decode else None)

    def _download(self, key: str) -> np.ndarray:
        shape, dtype = self.shapes[key]
        out = np.empty(shape, dtype=dtype)
        self.cuda("cudaMemcpy", out.ctypes.data, self.dev[key], out.nbytes, self.cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        return out

    def step_tokens(self, i: int) -> np.ndarray:
        return self._download(f"s{i}.next_tokens")

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine on explicit inputs (parity checks): each input is copied into the buffer bound to
        it, the engine runs, its outputs are downloaded."""
        g = self.manifest.graphs[name]
        i = g.step
        for t in g.inputs:
            key = self._source(i, t.name) if g.kind == "generator_step" else t.name
            arr = np.ascontiguousarray(feeds[t.name], dtype=self.shapes[key][1])
            self.cuda("cudaMemcpy", self.dev[key], arr.ctypes.data, arr.nbytes, self.cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        self._execute(name)
        self._sync()
        def key(t):
            if g.kind != "generator_step":
                return t.name
            return t.name.replace("_out_", "_") if t.name.startswith("cache_") else f"s{i}.{t.name}"

        return {t.name: self._download(key(t)) for t in g.outputs}

    def step_logits(self, i: int) -> np.ndarray:
        return self._download(f"s{i}.logits").astype(np.float32)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        self.host["tokens"][...] = tokens
        self._h2d("tokens")
        self._execute("decoder")
        self._d2h("images")
        self._sync()
        return np.array(self.host["images"])

    def close(self) -> None:
        if getattr(self, "scratch", None) is None:  # closed already, or never opened
            return
        self._sync()
        for g in self.graph_exec.values():
            self.cuda("cudaGraphExecDestroy", g)
        self.graph_exec.clear()
        self.contexts.clear()  # before the memory they use
        for ptr in self.dev.values():
            self.cuda("cudaFree", ptr)
        for arr in self.host.values():
            self.cuda("cudaFreeHost", arr.ctypes.data)
        self.cuda("cudaFree", self.scratch)
        self.cuda("cudaStreamDestroy", self.stream)
        self.scratch = None
        self.dev.clear()
        self.host.clear()
