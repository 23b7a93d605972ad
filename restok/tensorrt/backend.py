"""TensorRT backend: tensorrt + cuda-python + numpy, no torch.

One generator engine with one optimization profile per HAR pass and one execution context per profile
(contexts share the engine's weights; they never run concurrently, so all of them and the decoder's share
one user-managed scratch allocation). Every buffer of the binding plan is allocated once on the device for
the export's max batch and zeroed once (the in-place KV cache is read, masked, before it is written:
garbage could be NaN); the per-run host inputs (32 bytes of noise keys per image plus a few settings)
live in one pinned block that crosses to the device in one copy. For a run of b images every context
gets its input shapes and tensor addresses once; then the whole image (the input copy, the nine passes,
the device copies that chain each pass's tokens into the next and gather them for the decoder, the
decoder, the output copies) is captured into one CUDA graph per (batch size, decode) and replayed.

Facts this relies on, checked in TensorRT's headers and Python bindings (10.3.0, 10.15, 11.1) and in
cuda-python 12.9 / 13.4 (none of it has run on a GPU in this repository's CI; see scripts/gpu_check.sh):
- set_optimization_profile_async must precede set_input_shape; a new context uses profile 0; the profile
  is set once per context at creation, before any capture (trtexec does the same);
- after shapes change, one enqueue outside capture, then capture (a graph is valid for the shapes it was
  captured with: one graph per batch size);
- tensor names are the same in every profile; device_memory_size_v2 is the scratch needed over all
  profiles; set_device_memory(ptr, size) takes it;
- TensorRT drops graph inputs nothing reads (e.g. cfg_scale of a --no-cfg export): only the engine's own
  I/O tensors are bound, and each is checked against the manifest's dtype and static dimensions;
- cudaGraphInstantiate(graph, flags) and cudaMemcpy2DAsync return (err, ...) tuples in both versions.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import Backend
from restok.runtime.plan import CONSTANT, HOST_INPUT, Binding, PassPlan, RunInputs


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as e:
            raise ImportError("cuda-python is not installed: pip install 'cuda-python>=12.6,<13'") from e
    return cudart


class CudaError(RuntimeError):
    """A CUDA or TensorRT runtime call failed on the device."""


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
                raise MemoryError(f"the GPU ran out of memory in {fn}; use a smaller --max-batch, fp16/int8 engines, "
                                  "or free the device") from None
            raise CudaError(f"{fn} failed: {name}")
        return rest[0] if len(rest) == 1 else rest


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, **_):
        from restok.tensorrt.builder import import_tensorrt, tensorrt_manifest

        trt = import_tensorrt()
        super().__init__(folder, tensorrt_manifest(manifest, trt.__version__), threads)
        self.trt = trt
        self.cuda = _Cuda()
        self.stream = None
        self.scratch = None
        self.dev: dict[str, int] = {}  # plan buffer -> device pointer
        self.host_block = None  # pinned mirror of the HOST_INPUT buffers (one copy per run)
        self.dev_inputs = None
        self.host_offsets: dict[str, int] = {}
        self.engines, self.contexts, self.graph_exec, self.io_tensors = {}, {}, {}, {}
        self.bound_batch = 0
        self._inputs_dirty = False
        self._closed = False
        try:
            self._open()
        except BaseException:
            self.close()  # free what was allocated before the failure
            raise

    # ------------------------------------------------------------------ setup
    def _open(self) -> None:
        from restok.tensorrt.builder import check_engines, gpu_identity

        trt, cu, m = self.trt, self.cuda, self.manifest
        d, info = check_engines(self.folder, m, trt.__version__, gpu_identity())
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        for name in info["engines"]:
            engine = runtime.deserialize_cuda_engine((d / f"{name}.plan").read_bytes())
            if engine is None:
                raise CudaError(f"TensorRT could not deserialize {name}.plan; rebuild with restok build")
            self.engines[name] = engine
            self._check_io(name, engine)
        self.stream = cu("cudaStreamCreate")
        size = max(int(e.device_memory_size_v2) for e in self.engines.values())
        self.scratch = cu("cudaMalloc", max(size, 1))
        gen = self.engines["generator"]
        if gen.num_optimization_profiles != len(self.plan.passes):
            raise CudaError(f"the generator engine has {gen.num_optimization_profiles} profiles, the schedule "
                            f"{len(self.plan.passes)} passes; rebuild with restok build")
        for name, engine in self.engines.items():
            for prof in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if ctx is None:
                    raise CudaError(f"TensorRT could not create an execution context for {name}")
                ctx.set_device_memory(self.scratch, size)
                if prof:
                    ctx.set_optimization_profile_async(prof, int(self.stream))
                self.contexts[(name, prof)] = ctx
        self._sync()
        # one pinned host block and one device block for the per-run inputs (one copy per run)
        off = 0
        for key, buf in self.plan.buffers.items():
            if buf.kind == HOST_INPUT:
                self.host_offsets[key] = off
                off += -(-buf.nbytes // 64) * 64
        self.host_bytes = max(off, 1)
        self.host_ptr = int(cu("cudaMallocHost", self.host_bytes))
        self.host_block = np.frombuffer((ctypes.c_byte * self.host_bytes).from_address(self.host_ptr), dtype=np.uint8)
        self.dev_inputs = cu("cudaMalloc", self.host_bytes)
        cu("cudaMemsetAsync", self.dev_inputs, 0, self.host_bytes, self.stream)
        # every other plan buffer once on the device, zeroed (a non-null address even for an empty tensor)
        for key, buf in self.plan.buffers.items():
            if key in self.host_offsets:
                self.dev[key] = int(self.dev_inputs) + self.host_offsets[key]
                continue
            self.dev[key] = cu("cudaMalloc", max(buf.nbytes, 1))
            cu("cudaMemsetAsync", self.dev[key], 0, max(buf.nbytes, 1), self.stream)
        self._sync()
        for key, value in self.plan.constants().items():
            self._upload(key, value)

    def _check_io(self, name: str, engine) -> None:
        """Every engine I/O tensor is a manifest tensor with the same dtype and static dimensions."""
        g = self.manifest.graphs[name]
        specs = {t.name: t for t in (*g.inputs, *g.outputs)}
        for i in range(engine.num_io_tensors):
            t = engine.get_tensor_name(i)
            if t not in specs:
                raise ArtifactError(f"the {name} engine has a tensor {t!r} the manifest does not list; rebuild the engines")
            want = specs[t]
            have_dtype = np.dtype(self.trt.nptype(engine.get_tensor_dtype(t)))
            if have_dtype != np.dtype(want.dtype):
                raise ArtifactError(f"{name} engine tensor {t} is {have_dtype}, the manifest says {want.dtype}; rebuild")
            shape = tuple(engine.get_tensor_shape(t))
            if len(shape) != len(want.shape) or any(isinstance(w, int) and h not in (w, -1) for h, w in zip(shape, want.shape)):
                raise ArtifactError(f"{name} engine tensor {t} has shape {shape}, the manifest {want.shape}; rebuild")
        self.io_tensors[name] = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if name == "generator":
            for t in g.outputs:
                if t.aliases and t.name in self.io_tensors[name]:
                    aliased = getattr(engine, "get_aliased_input_tensor", None)
                    if aliased is not None and aliased(t.name) != t.aliases:
                        raise CudaError(f"TensorRT did not alias {t.name} to {t.aliases} (got {aliased(t.name)!r}); "
                                        "the in-place KV-cache update needs TensorRT >= 10.15")

    def _bind(self, ctx, bindings, batch: int, p: PassPlan | None, tensors: set[str], inputs: bool) -> None:
        for bd in bindings:
            t = bd.tensor.name
            if t not in tensors:  # an input TensorRT dropped (nothing reads it)
                continue
            shape = self.plan.shape(bd, batch, p)
            if inputs and not ctx.set_input_shape(t, shape):
                raise CudaError(f"set_input_shape({t}, {shape}) was refused (outside the engine's profile?)")
            if not ctx.set_tensor_address(t, int(self.dev[bd.buffer])):
                raise CudaError(f"set_tensor_address({t}) failed")

    def _bind_batch(self, batch: int) -> None:
        """Shapes and addresses of every context for runs of ``batch`` images (once per batch size)."""
        if batch == self.bound_batch:
            return
        for p in self.plan.passes:
            ctx = self.contexts[("generator", p.index)]
            self._bind(ctx, p.inputs, batch, p, self.io_tensors["generator"], inputs=True)
            self._bind(ctx, p.outputs, batch, p, self.io_tensors["generator"], inputs=False)
            missing = ctx.infer_shapes()
            if missing:
                raise CudaError(f"pass {p.index}: TensorRT cannot infer shapes, missing {missing}")
        dec_in, dec_out = self.plan.decoder
        dctx = self.contexts[("decoder", 0)]
        self._bind(dctx, dec_in, batch, None, self.io_tensors["decoder"], inputs=True)
        self._bind(dctx, dec_out, batch, None, self.io_tensors["decoder"], inputs=False)
        self.bound_batch = batch

    # ------------------------------------------------------------------ copies
    def _memcpy_kind(self, name: str):
        return getattr(self.cuda.rt.cudaMemcpyKind, name)

    def _h2d_inputs(self) -> None:
        self.cuda("cudaMemcpyAsync", self.dev_inputs, self.host_ptr, self.host_bytes,
                  self._memcpy_kind("cudaMemcpyHostToDevice"), self.stream)

    def _copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        self.cuda("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height,
                  self._memcpy_kind("cudaMemcpyDeviceToDevice"), self.stream)

    def _download(self, key: str, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self.cuda("cudaMemcpyAsync", out.ctypes.data, self.dev[key], out.nbytes,
                      self._memcpy_kind("cudaMemcpyDeviceToHost"), self.stream)
            self._sync()
        return out

    def _upload(self, key: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.plan.buffers[key].dtype)
        if arr.nbytes > self.plan.buffers[key].nbytes:
            raise ValueError(f"{key}: {arr.shape} does not fit the buffer {self.plan.buffers[key].shape}")
        if arr.nbytes:
            self.cuda("cudaMemcpyAsync", self.dev[key], arr.ctypes.data, arr.nbytes,
                      self._memcpy_kind("cudaMemcpyHostToDevice"), self.stream)
            self._sync()

    def _sync(self) -> None:
        self.cuda("cudaStreamSynchronize", self.stream)

    # ------------------------------------------------------------------- run
    def set_inputs(self, run: RunInputs) -> None:
        self.plan.check_batch(run.batch)
        self._bind_batch(run.batch)
        self.batch = run.batch
        for key, value in self.plan.host_values(run).items():
            o = self.host_offsets[key]
            self.host_block[o : o + value.nbytes] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        self._inputs_dirty = True

    def _execute(self, name: str, profile: int = 0) -> None:
        if not self.contexts[(name, profile)].execute_async_v3(int(self.stream)):
            raise CudaError(f"TensorRT execute_async_v3 failed for {name} (profile {profile})")

    def _enqueue_pass(self, i: int) -> None:
        """Pass i, then its tokens into pass i+1's first columns and into the decoder's input."""
        self._execute("generator", i)
        p = self.plan.passes[i]
        b, rows, n, N = self.batch, self.manifest.rows(self.batch), p.step.num_new, self.manifest.num_tokens
        src = self.dev[f"next_tokens.{i}"]
        if i + 1 < len(self.plan.passes):
            nxt = self.plan.passes[i + 1]
            dst = next(bd.buffer for bd in nxt.inputs if bd.tensor.role == "tokens")
            self._copy2d(self.dev[dst], 8 * nxt.step.num_new, src, 8 * n, 8 * nxt.tokens_width, rows)
        self._copy2d(self.dev["decoder.tokens"] + 8 * p.step.predicted.start, 8 * N, src, 8 * n, 8 * n, b)

    def _enqueue_all(self, decode: bool) -> None:
        self._h2d_inputs()
        for p in self.plan.passes:
            self._enqueue_pass(p.index)
        if decode:
            self._execute("decoder")

    def run_pass(self, i: int) -> None:
        if i == 0 or self._inputs_dirty:
            self._h2d_inputs()
            self._inputs_dirty = False
        self._enqueue_pass(i)
        self._sync()

    def capture(self, decode: bool = True) -> None:
        """Warm up once with the current shapes, then capture the whole run into one CUDA graph."""
        rt = self.cuda.rt
        self._enqueue_all(decode)
        self._sync()
        self.cuda("cudaStreamBeginCapture", self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            self._enqueue_all(decode)
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(self.stream)  # unchecked: the capture is void, report the cause
            if int(err) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = self.cuda("cudaStreamEndCapture", self.stream)
        try:
            self.graph_exec[(self.batch, decode)] = self.cuda("cudaGraphInstantiate", graph, 0)
        finally:
            self.cuda("cudaGraphDestroy", graph)

    def run_fused(self, decode: bool = True):
        """The whole run as one CUDA-graph replay -> (tokens [b, N], images or None)."""
        if (self.batch, decode) not in self.graph_exec:
            self.capture(decode)
        self.cuda("cudaGraphLaunch", self.graph_exec[(self.batch, decode)], self.stream)
        self._inputs_dirty = False
        b, N = self.batch, self.manifest.num_tokens
        tokens = self._download("decoder.tokens", (b, N), np.int64)
        images = None
        if decode:
            (_, tout) = self.plan.decoder
            images = self._download(tout[0].buffer, self.plan.shape(tout[0], b), np.float32)
        return tokens, images

    def _pass_binding(self, i: int, role: str) -> Binding:
        p = self.plan.passes[i]
        return next(bd for bd in (*p.inputs, *p.outputs) if bd.tensor.role == role)

    def pass_tokens(self, i: int) -> np.ndarray:
        bd = self._pass_binding(i, "next_tokens")
        return self._download(bd.buffer, self.plan.shape(bd, self.batch, self.plan.passes[i]), np.int64)

    def pass_logits(self, i: int) -> np.ndarray:
        bd = self._pass_binding(i, "logits")
        return self._download(bd.buffer, self.plan.shape(bd, self.batch, self.plan.passes[i]), np.float32)

    def pass_feeds(self, i: int) -> dict[str, np.ndarray]:
        if self._inputs_dirty:
            self._h2d_inputs()
            self._inputs_dirty = False
        p = self.plan.passes[i]
        return {bd.tensor.name: self._download(bd.buffer, self.plan.shape(bd, self.batch, p),
                                               self.plan.buffers[bd.buffer].dtype) for bd in p.inputs}

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine on explicit inputs (parity checks): the generator pass is found from ``positions``;
        the inputs are copied into that pass's buffers, the pass runs, its outputs are downloaded."""
        if name == "generator":
            pos = np.asarray(feeds["positions"]).reshape(-1)
            p = next((q for q in self.plan.passes if np.array_equal(q.step.position_ids, pos)), None)
            if p is None:
                raise ValueError(f"positions {pos.tolist()} are not those of a pass of the schedule")
            batch = int(np.asarray(feeds["noise_keys"]).shape[0])
            self.plan.check_batch(batch)
            self._bind_batch(batch)
            self.batch = batch
            for bd in p.inputs:
                if self.plan.buffers[bd.buffer].kind != CONSTANT:
                    self._upload(bd.buffer, feeds[bd.tensor.name])
            self._execute("generator", p.index)
            self._sync()
            return {bd.tensor.name: self._download(bd.buffer, self.plan.shape(bd, batch, p),
                                                   self.plan.buffers[bd.buffer].dtype) for bd in p.outputs}
        if name == "decoder":
            return {"images": self.decode(np.asarray(feeds["tokens"]))}
        if name == "encoder":
            return {"tokens": self.encode(np.asarray(feeds["images"]))}
        raise KeyError(f"no engine {name!r}")

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        b = tokens.shape[0]
        self.plan.check_batch(b)
        self._bind_batch(b)
        (tin,), (tout,) = self.plan.decoder
        self._upload(tin.buffer, tokens)
        self._execute("decoder")
        return self._download(tout.buffer, self.plan.shape(tout, b), np.float32)

    @property
    def has_encoder(self) -> bool:
        return ("encoder", 0) in self.contexts

    def encode(self, images: np.ndarray) -> np.ndarray:
        if ("encoder", 0) not in self.contexts:
            raise ArtifactError("no encoder engine was built; build it with restok build --artifacts DIR --encoder")
        cu, b = self.cuda, images.shape[0]
        self.plan.check_batch(b)
        g = self.manifest.graphs["encoder"]
        (tin,), (tout,) = g.inputs, g.outputs
        ishape, oshape = tin.resolve({"batch": b}), tout.resolve({"batch": b})
        x = np.ascontiguousarray(images, dtype=np.float32)
        out = np.empty(oshape, dtype=np.dtype(tout.dtype))
        src, dst = cu("cudaMalloc", max(x.nbytes, 1)), cu("cudaMalloc", max(out.nbytes, 1))
        try:
            ctx = self.contexts[("encoder", 0)]
            if not (ctx.set_input_shape(tin.name, ishape) and ctx.set_tensor_address(tin.name, int(src))
                    and ctx.set_tensor_address(tout.name, int(dst))):
                raise CudaError("encoder: binding failed")
            cu("cudaMemcpy", src, x.ctypes.data, x.nbytes, self._memcpy_kind("cudaMemcpyHostToDevice"))
            self._execute("encoder")
            self._sync()
            cu("cudaMemcpy", out.ctypes.data, dst, out.nbytes, self._memcpy_kind("cudaMemcpyDeviceToHost"))
        finally:
            cu("cudaFree", src)
            cu("cudaFree", dst)
        return out

    def close(self) -> None:
        """Free everything this backend allocated; safe to call twice or after a failed constructor."""
        if self._closed:
            return
        self._closed = True
        cu = self.cuda
        if self.stream is not None:
            self._sync()
        for g in self.graph_exec.values():
            cu("cudaGraphExecDestroy", g)
        self.graph_exec.clear()
        self.contexts.clear()  # before the memory they use
        inputs = set(self.host_offsets)
        for key, ptr in self.dev.items():
            if key not in inputs:
                cu("cudaFree", ptr)
        self.dev.clear()
        if self.dev_inputs is not None:
            cu("cudaFree", self.dev_inputs)
            self.dev_inputs = None
        if self.host_block is not None:
            cu("cudaFreeHost", self.host_ptr)
            self.host_block = None
        if self.scratch is not None:
            cu("cudaFree", self.scratch)
            self.scratch = None
        self.engines.clear()
        if self.stream is not None:
            cu("cudaStreamDestroy", self.stream)
            self.stream = None
