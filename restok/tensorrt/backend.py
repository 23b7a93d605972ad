"""TensorRT backend: tensorrt + cuda-python + numpy, no torch.

One generator engine with one optimization profile per HAR pass. Runs are padded to a batch bucket
(``restok.runtime.gpu``), and each bucket has its own execution contexts (one per generator profile, one
for the decoder), made and bound once: TensorRT invalidates a CUDA graph captured with a context whose
input shapes change afterwards (NVIDIA, TensorRT issue 3798: "use one execution context per captured graph,
and share memory across the contexts"), and dynamic batching alternates batch sizes at once. Every
context of every bucket shares one user-managed scratch allocation (runs never overlap: one stream). Every
buffer of the binding plan is allocated once on the device for the export's max batch and zeroed once (the
in-place KV cache is read, masked, before it is written); the per-run host inputs live in one pinned block,
each at a 256-byte aligned offset (``setTensorAddress`` requires 256-byte alignment), that crosses to the
device in one copy. The whole image (that copy, the nine passes, the device copies that chain each pass's
tokens into the next and gather them for the decoder, the decoder) is one CUDA graph per (bucket, decode),
captured on first use or at load (``warmup``); a capture that fails is ended, its error cleared, and that
configuration runs without a graph. ``cuda_graphs=False`` never captures (the pipeline then runs pass by
pass). Explicit runs (parity checks, decoding given tokens) use a separate set of contexts that is rebound
freely and never captured.

Facts this relies on, checked in TensorRT's headers and Python bindings (10.3.0, 10.15, 11.1) and in
cuda-python 12.9 / 13.4 (none of it has run on a GPU in this repository's CI; see scripts/gpu_check.sh):
- set_optimization_profile_async must precede set_input_shape; a new context uses profile 0; the profile
  is set once per context at creation, before any capture (trtexec does the same);
- after shapes are set, one enqueue outside capture, then capture;
- tensor names are the same in every profile; device_memory_size_v2 is the scratch needed over all
  profiles; set_device_memory(ptr, size) takes it, for any number of contexts that never run at once;
- TensorRT drops graph inputs nothing reads (e.g. cfg_scale of a --no-cfg export): only the engine's own
  I/O tensors are bound, and each is checked against the manifest's dtype and static dimensions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import Backend
from restok.runtime.gpu import GraphCache, HostBlock, bucket_for, buckets, real_rows
from restok.runtime.plan import CONSTANT, Binding, PassPlan, RunInputs
from restok.tensorrt.cuda import Cuda, CudaError, gpu_identity

ADHOC = "adhoc"  # the binding set of explicit runs (never captured)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, cuda_graphs: bool = True,
                 warmup: bool = False, log_level: str | None = None, **_):
        from restok.tensorrt.builder import import_tensorrt, tensorrt_manifest

        trt = import_tensorrt()
        super().__init__(folder, tensorrt_manifest(manifest, trt.__version__), threads)
        self.trt = trt
        self.cuda = Cuda()
        self.use_graphs = cuda_graphs
        self.graphs = GraphCache("restok tensorrt")
        self.stream = None
        self.scratch, self.scratch_size = None, 0
        self.dev: dict[str, int] = {}  # plan buffer -> device pointer
        self.engines, self.io_tensors = {}, {}
        self.bound: dict = {}  # bucket (or ADHOC) -> {"batch": b, "contexts": {(graph, profile): context}}
        self.bucket = 0
        self.encoder_context = None
        self._stale = False  # the host block holds inputs the device has not seen
        self._closed = False
        try:
            self._open(log_level)
            if warmup:
                self.warm_up()
        except BaseException:
            self.close()  # free what was allocated before the failure
            raise

    # ------------------------------------------------------------------ setup
    def _open(self, level: str | None) -> None:
        from restok.tensorrt.builder import check_engines, check_gpu, trt_logger

        trt, cu, m = self.trt, self.cuda, self.manifest
        gpu = gpu_identity(cu.rt)
        check_gpu(m, gpu)
        d, info = check_engines(self.folder, m, trt.__version__, gpu)
        self.logger = trt_logger(trt, level)
        runtime = trt.Runtime(self.logger)
        for name in info["engines"]:
            engine = runtime.deserialize_cuda_engine((d / f"{name}.plan").read_bytes())
            if engine is None:
                raise CudaError(f"TensorRT could not deserialize {name}.plan; rebuild with restok build")
            self.engines[name] = engine
            self._check_io(name, engine)
        gen = self.engines["generator"]
        if gen.num_optimization_profiles != len(self.plan.passes):
            raise CudaError(f"the generator engine has {gen.num_optimization_profiles} profiles, the schedule "
                            f"{len(self.plan.passes)} passes; rebuild with restok build")
        self.stream = cu("cudaStreamCreate")
        self.scratch_size = max(int(e.device_memory_size_v2) for e in self.engines.values())
        self.scratch = cu.malloc(self.scratch_size)
        # one pinned host block and its device mirror for the per-run inputs (one copy per run)
        self.layout = HostBlock.of(self.plan)
        self.host_ptr, self.host_block = cu.pinned(self.layout.nbytes)
        self.dev_inputs = cu.malloc(self.layout.nbytes, self.stream)
        # every other plan buffer once on the device, zeroed (a non-null address even for an empty tensor)
        for key, buf in self.plan.buffers.items():
            off = self.layout.offsets.get(key)
            self.dev[key] = self.dev_inputs + off if off is not None else cu.malloc(buf.nbytes, self.stream)
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

    def _new_contexts(self) -> dict:
        """One context per generator profile and one decoder context, sharing the scratch memory."""
        trt, out = self.trt, {}
        for name in ("generator", "decoder"):
            engine = self.engines[name]
            for prof in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if ctx is None:
                    raise CudaError(f"TensorRT could not create an execution context for {name}")
                ctx.set_device_memory(self.scratch, self.scratch_size)
                if prof:
                    ctx.set_optimization_profile_async(prof, int(self.stream))
                out[(name, prof)] = ctx
        self._sync()
        return out

    def _contexts(self, key, batch: int) -> dict:
        """The contexts of binding set ``key`` with shapes and addresses for ``batch`` images. A bucket's set
        is made and bound once and never rebound (its graphs stay valid); the ADHOC set is rebound at will."""
        have = self.bound.get(key)
        if have is not None and have["batch"] == batch:
            return have["contexts"]
        if have is not None and key != ADHOC:
            raise CudaError(f"the contexts of bucket {key} are bound for {have['batch']} images, not {batch}")
        contexts = have["contexts"] if have is not None else self._new_contexts()
        for p in self.plan.passes:
            ctx = contexts[("generator", p.index)]
            self._bind(ctx, p.inputs, batch, p, self.io_tensors["generator"], inputs=True)
            self._bind(ctx, p.outputs, batch, p, self.io_tensors["generator"], inputs=False)
            missing = ctx.infer_shapes()
            if missing:
                raise CudaError(f"pass {p.index}: TensorRT cannot infer shapes, missing {missing}")
        dec_in, dec_out = self.plan.decoder
        dctx = contexts[("decoder", 0)]
        self._bind(dctx, dec_in, batch, None, self.io_tensors["decoder"], inputs=True)
        self._bind(dctx, dec_out, batch, None, self.io_tensors["decoder"], inputs=False)
        self.bound[key] = {"batch": batch, "contexts": contexts}
        return contexts

    # ------------------------------------------------------------------ copies
    def _download(self, key: str, shape, dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self.cuda.to_host(out.ctypes.data, self.dev[key], out.nbytes, self.stream)
            self._sync()
        return out

    def _upload(self, key: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.plan.buffers[key].dtype)
        if arr.nbytes > self.plan.buffers[key].nbytes:
            raise ValueError(f"{key}: {arr.shape} does not fit the buffer {self.plan.buffers[key].shape}")
        if arr.nbytes:
            self.cuda.to_device(self.dev[key], arr.ctypes.data, arr.nbytes, self.stream)
            self._sync()

    def _h2d_inputs(self) -> None:
        self.cuda.to_device(self.dev_inputs, self.host_ptr, self.layout.nbytes, self.stream)

    def _sync(self) -> None:
        self.cuda("cudaStreamSynchronize", self.stream)

    # ------------------------------------------------------------------- run
    def set_inputs(self, run: RunInputs) -> None:
        """The run padded to its bucket, written into the pinned block (no device work yet)."""
        self.plan.check_batch(run.batch)
        bucket = bucket_for(run.batch, self.manifest.max_batch)
        self._contexts(bucket, bucket)
        for key, value in self.plan.host_values(run.padded(bucket)).items():
            o = self.layout.offsets[key]
            self.host_block[o : o + value.nbytes] = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
        self.batch, self.bucket = run.batch, bucket
        self._stale = True

    def _execute(self, contexts: dict, name: str, profile: int = 0) -> None:
        if not contexts[(name, profile)].execute_async_v3(int(self.stream)):
            raise CudaError(f"TensorRT execute_async_v3 failed for {name} (profile {profile})")

    def _enqueue_pass(self, contexts: dict, i: int, bucket: int) -> None:
        """Pass i, then its tokens into pass i+1's first columns and into the decoder's input."""
        self._execute(contexts, "generator", i)
        p = self.plan.passes[i]
        rows, n, N = self.manifest.rows(bucket), p.step.num_new, self.manifest.num_tokens
        src = self.dev[f"next_tokens.{i}"]
        if i + 1 < len(self.plan.passes):
            nxt = self.plan.passes[i + 1]
            dst = next(bd.buffer for bd in nxt.inputs if bd.tensor.role == "tokens")
            self.cuda.copy_2d(self.dev[dst], 8 * nxt.step.num_new, src, 8 * n, 8 * nxt.tokens_width, rows, self.stream)
        self.cuda.copy_2d(self.dev["decoder.tokens"] + 8 * p.step.predicted.start, 8 * N, src, 8 * n, 8 * n, bucket,
                          self.stream)

    def _enqueue_all(self, bucket: int, decode: bool) -> None:
        contexts = self.bound[bucket]["contexts"]
        self._h2d_inputs()
        for p in self.plan.passes:
            self._enqueue_pass(contexts, p.index, bucket)
        if decode:
            self._execute(contexts, "decoder")

    def _capture(self, key: tuple):
        """Warm up once with the bucket's shapes, then capture the whole run into one CUDA graph."""
        bucket, decode = key
        self._contexts(bucket, bucket)
        self._enqueue_all(bucket, decode)
        self._sync()
        return self.cuda.capture(self.stream, lambda: self._enqueue_all(bucket, decode))

    def warm_up(self) -> int:
        """Capture the graph of every bucket now (with decoding) rather than on first use."""
        if self.use_graphs:
            for b in buckets(self.manifest.max_batch):
                self.graphs.get((b, True), lambda b=b: self._capture((b, True)))
        return len(self.graphs.graphs)

    def run_fused(self, decode: bool = True, output: str = "float"):
        """The whole run as one CUDA-graph replay (or, where its capture failed, enqueued without a graph)
        -> (tokens [b, N], images or None); None with cuda_graphs=False (the pipeline goes pass by pass)."""
        if not self.use_graphs:
            return None
        key = (self.bucket, decode)
        graph = self.graphs.get(key, lambda: self._capture(key))
        if graph is None:
            self._enqueue_all(*key)
        else:
            self.cuda.launch(graph, self.stream)
        self._sync()
        self._stale = False
        b, N = self.batch, self.manifest.num_tokens
        tokens = self._download("decoder.tokens", (b, N), np.int64)
        images = None
        if decode:
            (_, tout) = self.plan.decoder
            images = self._download(tout[0].buffer, self.plan.shape(tout[0], b), np.float32)
            if output == "uint8":
                from restok.images import to_uint8

                images = to_uint8(images)
        return tokens, images

    def run_pass(self, i: int) -> None:
        if i == 0 or self._stale:
            self._h2d_inputs()
            self._stale = False
        self._enqueue_pass(self.bound[self.bucket]["contexts"], i, self.bucket)
        self._sync()

    def _pass_binding(self, i: int, role: str) -> Binding:
        p = self.plan.passes[i]
        return next(bd for bd in (*p.inputs, *p.outputs) if bd.tensor.role == role)

    def _real(self, bd: Binding, p: PassPlan | None, arr: np.ndarray) -> np.ndarray:
        """The real images' part of a tensor computed for the bucket."""
        axis = bd.tensor.shape[0] if bd.tensor.shape else None
        if axis not in ("rows", "batch"):
            return arr
        return arr[real_rows(self.batch, self.bucket, self.manifest.guided, axis)]

    def _pass_tensor(self, i: int, bd: Binding) -> np.ndarray:
        p = self.plan.passes[i]
        arr = self._download(bd.buffer, self.plan.shape(bd, self.bucket, p), self.plan.buffers[bd.buffer].dtype)
        return self._real(bd, p, arr)

    def pass_tokens(self, i: int) -> np.ndarray:
        return self._pass_tensor(i, self._pass_binding(i, "next_tokens"))

    def pass_logits(self, i: int) -> np.ndarray:
        return self._pass_tensor(i, self._pass_binding(i, "logits")).astype(np.float32)

    def pass_feeds(self, i: int) -> dict[str, np.ndarray]:
        if self._stale:
            self._h2d_inputs()
            self._stale = False
        return {bd.tensor.name: self._pass_tensor(i, bd) for bd in self.plan.passes[i].inputs}

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine on explicit inputs (parity checks), on the ADHOC contexts: the generator pass is found
        from ``positions``; the inputs are copied into that pass's buffers, the pass runs, its outputs are
        downloaded."""
        if name == "generator":
            pos = np.asarray(feeds["positions"]).reshape(-1)
            p = next((q for q in self.plan.passes if np.array_equal(q.step.position_ids, pos)), None)
            if p is None:
                raise ValueError(f"positions {pos.tolist()} are not those of a pass of the schedule")
            batch = int(np.asarray(feeds["noise_keys"]).shape[0])
            self.plan.check_batch(batch)
            contexts = self._contexts(ADHOC, batch)
            for bd in p.inputs:
                if self.plan.buffers[bd.buffer].kind != CONSTANT:
                    self._upload(bd.buffer, feeds[bd.tensor.name])
            self._stale = True  # the inputs block was overwritten
            self._execute(contexts, "generator", p.index)
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
        contexts = self._contexts(ADHOC, b)
        (tin,), (tout,) = self.plan.decoder
        self._upload(tin.buffer, tokens)
        self._execute(contexts, "decoder")
        return self._download(tout.buffer, self.plan.shape(tout, b), np.float32)

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self.engines

    def encode(self, images: np.ndarray) -> np.ndarray:
        if "encoder" not in self.engines:
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
            if self.encoder_context is None:
                self.encoder_context = self.engines["encoder"].create_execution_context(
                    self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                self.encoder_context.set_device_memory(self.scratch, self.scratch_size)
            ctx = self.encoder_context
            if not (ctx.set_input_shape(tin.name, ishape) and ctx.set_tensor_address(tin.name, int(src))
                    and ctx.set_tensor_address(tout.name, int(dst))):
                raise CudaError("encoder: binding failed")
            cu("cudaMemcpy", src, x.ctypes.data, x.nbytes, cu.kind("cudaMemcpyHostToDevice"))
            self._execute("encoder")
            self._sync()
            cu("cudaMemcpy", out.ctypes.data, dst, out.nbytes, cu.kind("cudaMemcpyDeviceToHost"))
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
        for g in self.graphs.clear():
            cu.destroy(g)
        self.bound.clear()  # the contexts, before the memory they use
        self.encoder_context = None
        self.dev.clear()
        cu.free_all()
        self.scratch = None
        self.engines.clear()
        if self.stream is not None:
            cu("cudaStreamDestroy", self.stream)
            self.stream = None
