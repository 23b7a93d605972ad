"""CUDA backend: the exported modules (``restok.export.modules``: the graphs' math, sampling included) run
by PyTorch on a GPU, where TensorRT is absent. The one runtime module besides the reference that imports
torch, and only when a backend is made.

Why it is shaped this way: an eager L image on an H200 is 18,418 kernel launches for 36.8 ms of GPU work
in 299 ms of wall time, so the cost is the host, not the device. Hence:
- every buffer of the binding plan lives on the device, allocated once for the export's max batch (the KV
  cache is one fixed-size in-place cache per layer, whatever KV form the export's ONNX graph uses); the
  per-run host inputs (noise keys, settings, labels) sit in one pinned block (``restok.runtime.gpu``) that
  crosses in one copy; pass i's tokens reach pass i+1 and the decoder's input on the device; only the
  results come back (tokens, and images as uint8 or float32);
- the nine passes and the decoder are one CUDA graph per (batch bucket, decode, output, filters): a run of
  b images is padded to the smallest bucket >= b; graphs are captured on first use, or all at load with
  ``warmup``; ``cuda_graphs=False`` runs the same code eagerly (debugging, and every run on a CPU);
- bf16 by default on a GPU (RMSNorm, RoPE, softmax and sampling in fp32, as the fp16 export keeps them,
  and the final norm and LM head in fp32 too: on the bundled model bf16 kept 94.5% of sampled tokens
  equal to fp32 with a bf16 head, 98.0% with an fp32 one), fp16 and fp32 on request; the decoder in the
  same precision with channels-last convolutions and SDPA attention. ``restok check --backend cuda``
  gates it against the fp32 graphs;
- sampling is one fused kernel per pass where Triton runs (``restok.runtime.cuda_sampler``), and a batch
  that needs no top-k or top-p runs without that filter; logits are kept only when a caller asks for them.

With ``device="cpu"`` the same class runs without graphs: what CI checks (tokens equal to ONNX Runtime's,
padded buckets equal to unpadded runs, one host copy per run). Only capture and replay need a GPU.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from restok.contract import GraphSpec, generator_signature
from restok.manifest import ArtifactError, Manifest
from restok.noise import NOISE_KEYS
from restok.runtime.backend import Backend
from restok.runtime.gpu import GraphCache, HostBlock, bucket_for, buckets
from restok.runtime.plan import HOST_INPUT, BindingPlan, RunInputs

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def static_cache_view(m: Manifest) -> Manifest:
    """The export seen with a fixed-size in-place KV cache: the binding plan the CUDA backend allocates (it
    runs the modules, not the ONNX graph, so the export's own KV form does not matter)."""
    g = m.graphs["generator"]
    ins, outs = generator_signature(vocab_size=m.vocab_size, num_layers=int(m.generator["n_layer"]),
                                    kv_heads=m.kv_heads, head_dim=m.head_dim, seq_len=m.har_schedule().seq_len,
                                    kv_dtype="float32", kv_cache="inplace")
    return replace(m, graphs={**m.graphs, "generator": GraphSpec("generator", g.file, ins, outs, g.opset)},
                   kv_cache="inplace", fallback={})


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, device: str = "cuda",
                 compute_precision: str = "auto", cuda_graphs: bool = True, warmup: bool = False,
                 sampler: str = "auto", reference: tuple | None = None, models: tuple | None = None, **_):
        import torch

        from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorGraph
        from restok.runtime.cuda_sampler import make_sampler
        from restok.runtime.torch_backend import load_source_models

        super().__init__(folder, manifest, threads)
        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EnvironmentError("the cuda backend needs a CUDA device visible to PyTorch, and none is here "
                                   "(use --backend onnxruntime, or --device cpu to debug the cuda backend)")
        if compute_precision not in PRECISIONS:
            raise ValueError(f"the cuda backend's precision is one of {', '.join(PRECISIONS)}, got {compute_precision!r}")
        if compute_precision == "auto":
            compute_precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = compute_precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_precision]
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        if self.device.type == "cuda" and self.dtype == torch.float32:  # fp32 means fp32: it is the parity rung
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # models: (tokenizer, generator) held by the caller (moved and cast in place: pass copies to share)
        tok, gen = models if models is not None else load_source_models(manifest, "cpu", reference)
        self.gen = gen.to(self.device, self.dtype).eval()
        if self.dtype != torch.float32:  # the final norm and the LM head in fp32: logits are what sampling reads
            self.gen.norm.float()
            self.gen.output.float()
        self.tok = tok.to(self.device, self.dtype).eval()
        if self.device.type == "cuda":
            self.tok.pixel_decoder.to(memory_format=torch.channels_last)
        for holder in (self.tok.decoder, getattr(self.tok, "encoder", None)):  # float32 tables kept on the host
            if holder is not None and isinstance(getattr(holder, "_rope", None), tuple):
                holder._rope = tuple(t.to(self.device) for t in holder._rope)
        self.graph = GeneratorGraph(self.gen, manifest.guided, "inplace")
        self.export_graphs = {"generator": GeneratorGraph(self.gen, manifest.guided, manifest.kv_cache),
                              "decoder": DecoderGraph(self.tok), "encoder": EncoderGraph(self.tok)}
        self.rope = self.gen.rope_tables(self.device)
        self.sampler = make_sampler(sampler, self.device.type)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = GraphCache("restok cuda")
        self._allocate()
        self.bucket = 0
        self.needs: tuple[bool, bool] = (False, False)  # (top-k, top-p) of the current run
        self._stale = True  # the host block holds inputs the device has not seen
        self.wait_seconds = 0.0  # time the host spent waiting for the device (_sync)
        if warmup:
            self.warm_up()

    def binding_plan(self, manifest: Manifest) -> BindingPlan:
        return BindingPlan(static_cache_view(manifest))

    # ------------------------------------------------------------------ memory
    def _torch_dtype(self, key: str, dtype: np.dtype):
        torch = self.torch
        if key.startswith("kv."):
            return self.dtype
        return {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]

    def _allocate(self) -> None:
        """Every plan buffer once on the device at max batch, zeroed (the in-place cache is read, masked,
        before it is written); the host inputs as views of one pinned block and its device mirror."""
        torch, plan, dev = self.torch, self.plan, self.device
        self.layout = HostBlock.of(plan)
        pinned = dev.type == "cuda"
        self.host_block = torch.zeros(self.layout.nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.device_block = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=dev)
        self.buf, self.host = {}, {}
        for key, b in plan.buffers.items():
            dt = self._torch_dtype(key, b.dtype)
            if b.kind == HOST_INPUT:
                o, n = self.layout.offsets[key], b.nbytes
                self.host[key] = self.host_block[o : o + n].view(dt)
                self.buf[key] = self.device_block[o : o + n].view(dt)
            elif key != "logits":  # the logits are kept only when asked (pass_logits)
                self.buf[key] = torch.zeros(b.shape, dtype=dt, device=dev)
        for key, value in plan.constants().items():
            self.buf[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        m, N, S = self.manifest, self.manifest.num_tokens, self.manifest.image_size
        self.out_tokens = torch.zeros((m.max_batch, N), dtype=torch.int64, pin_memory=pinned)
        self.out_images = {"float": torch.zeros((m.max_batch, 3, S, S), dtype=torch.float32, pin_memory=pinned),
                           "uint8": torch.zeros((m.max_batch, S, S, 3), dtype=torch.uint8, pin_memory=pinned)}
        self.kv = [(self.buf[f"kv.cache_key_{i}"], self.buf[f"kv.cache_value_{i}"])
                   for i in range(int(m.generator["n_layer"]))]
        self.logits: dict[int, object] = {}

    def view(self, key: str, shape: tuple[int, ...]):
        """The prefix of buffer ``key`` (device) as a contiguous tensor of ``shape``."""
        n = int(np.prod(shape, dtype=np.int64))
        return self.buf[key].reshape(-1)[:n].view(shape)

    def _host_view(self, key: str, shape: tuple[int, ...]):
        n = int(np.prod(shape, dtype=np.int64))
        return self.host[key].reshape(-1)[:n].view(shape)

    # ------------------------------------------------------------------ inputs
    def set_inputs(self, run: RunInputs) -> None:
        """The run padded to its bucket, written into the host block (no device work yet)."""
        self.plan.check_batch(run.batch)
        bucket = bucket_for(run.batch, self.manifest.max_batch)
        for key, value in self.plan.host_values(run.padded(bucket)).items():
            self._host_view(key, value.shape).copy_(self.torch.from_numpy(np.ascontiguousarray(value)))
        self.batch, self.bucket = run.batch, bucket
        self.needs = (run.needs_top_k, run.needs_top_p)
        self._stale = True

    def _upload(self) -> None:
        """The run's one host-to-device copy: the whole input block."""
        self.device_block.copy_(self.host_block, non_blocking=True)

    # ------------------------------------------------------------------- passes
    def _pass(self, i: int, bucket: int, needs: tuple[bool, bool], keep_logits: bool = False) -> None:
        """Pass i for ``bucket`` images on the device: embed, transformer over the in-place cache, sample;
        its tokens go into pass i+1's input and the decoder's."""
        from restok.export.modules import StaticKV

        m, p = self.manifest, self.plan.passes[i]
        st = p.step
        R, n = m.rows(bucket), st.num_new
        h = self.graph.embed(self.view(f"tokens.{i}", (R, n)), self.buf[f"embed_sources.{i}"])
        rope = (self.rope[0][st.cached : st.total], self.rope[1][st.cached : st.total])
        caches = [StaticKV(k[:R], v[:R]) for k, v in self.kv]
        logits = self.gen.run_layers(h, rope, None, caches, st.cached)  # float32 [R, n, V]
        if keep_logits:
            self.logits[i] = logits
        out = self.view(f"next_tokens.{i}", (R, n))
        cfg = self.view(f"cfg_scale.{i}", (bucket,)) if m.guided else None
        nxt = self.sampler(logits, self.view("noise_keys", (bucket, NOISE_KEYS)),
                           self.buf[f"positions.{i}"], cfg, self.view("temperature", (bucket,)),
                           self.view("top_k", (bucket,)), self.view("top_p", (bucket,)), *needs)
        out[:bucket].copy_(nxt)
        if m.guided:
            out[bucket:].copy_(nxt)
        if i + 1 < len(self.plan.passes):
            nxt_pass = self.plan.passes[i + 1]
            dst = self.view(f"tokens.{i + 1}", (R, nxt_pass.step.num_new))
            dst[:, : nxt_pass.tokens_width].copy_(out)
        self.view("decoder.tokens", (bucket, m.num_tokens))[:, st.predicted].copy_(nxt)

    def _decode(self, bucket: int, output: str) -> None:
        """The decoder on the gathered tokens; images into the host output (float32 or uint8, NHWC)."""
        images = self.export_graphs["decoder"](self.view("decoder.tokens", (bucket, self.manifest.num_tokens)))
        if output == "uint8":
            images = (images * 255.0).clamp_(0.0, 255.0).to(self.torch.uint8).permute(0, 2, 3, 1)
        self.out_images[output][:bucket].copy_(images, non_blocking=True)

    def _forward(self, bucket: int, decode: bool, output: str, needs: tuple[bool, bool]) -> None:
        """One whole run on the device (what a graph captures): the input copy, nine passes, the decoder,
        the output copies."""
        self._upload()
        for p in self.plan.passes:
            self._pass(p.index, bucket, needs)
        self.out_tokens[:bucket].copy_(self.view("decoder.tokens", (bucket, self.manifest.num_tokens)),
                                       non_blocking=True)
        if decode:
            self._decode(bucket, output)

    def _capture(self, key: tuple):
        torch = self.torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up: allocations and lazy initialisation happen outside capture
            self._forward(*key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool()):
                self._forward(*key)
        except Exception:
            try:  # clear what the failed capture left (torch ends the capture on the way out)
                torch.cuda.synchronize(self.device)
            except Exception:
                pass
            raise
        return graph

    def _pool(self):
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = self.torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
        return self._graph_pool

    def _sync(self) -> None:
        """Wait for the device; the wait is counted in ``wait_seconds`` (what remains of a run's wall time is
        host time: the GPU check's host-per-image figure)."""
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            self.torch.cuda.current_stream(self.device).synchronize()
            self.wait_seconds += time.perf_counter() - t0

    def run_fused(self, decode: bool = True, output: str = "float"):
        """The whole run (one graph replay where graphs are on) -> (tokens [b, N], images [b, ...] or None)."""
        if output not in self.out_images:
            raise ValueError(f"output must be float or uint8, got {output!r}")
        key = (self.bucket, decode, output, self.needs)
        with self.torch.inference_mode():
            graph = self.graphs.get(key, lambda: self._capture(key)) if self.use_graphs else None
            if graph is not None:
                graph.replay()
            else:
                self._forward(*key)
            self._sync()
        self._stale = False
        b = self.batch
        tokens = self.out_tokens[:b].numpy().copy()
        return tokens, (self.out_images[output][:b].numpy().copy() if decode else None)

    def warm_up(self, decode: bool = True, output: str = "float") -> int:
        """Capture the graph of every bucket for the default sampling (top-p, no top-k) now rather than on
        first use; returns how many graphs exist."""
        if not self.use_graphs:
            return 0
        with self.torch.inference_mode():
            for b in buckets(self.manifest.max_batch):
                key = (b, decode, output, (False, True))
                self.graphs.get(key, lambda key=key: self._capture(key))
        return len(self.graphs.graphs)

    # ---------------------------------------------------------- pass by pass
    def run_pass(self, i: int) -> None:
        with self.torch.inference_mode():
            if i == 0 or self._stale:
                self._upload()
                self._stale = False
            self._pass(i, self.bucket, self.needs, keep_logits=True)
            self._sync()

    def _real_rows(self, x):
        """Rows of the real images (cond, then uncond) of a padded [rows(bucket), ...] tensor."""
        b, bp = self.batch, self.bucket
        if not self.manifest.guided or b == bp:
            return x[: self.manifest.rows(b)]
        return self.torch.cat([x[:b], x[bp : bp + b]])

    def pass_tokens(self, i: int) -> np.ndarray:
        p = self.plan.passes[i]
        out = self.view(f"next_tokens.{i}", (self.manifest.rows(self.bucket), p.step.num_new))
        return self._real_rows(out).cpu().numpy()

    def pass_logits(self, i: int) -> np.ndarray:
        if i not in self.logits:
            raise ValueError(f"pass {i}'s logits were not kept: run it with run_pass first")
        return self._real_rows(self.logits[i]).float().cpu().numpy()

    def pass_feeds(self, i: int) -> dict[str, np.ndarray]:
        """Pass i's inputs in the export's graph form (by input name) for the current run."""
        m, p = self.manifest, self.plan.passes[i]
        if self._stale:
            with self.torch.inference_mode():
                self._upload()
            self._stale = False
        st, b = p.step, self.batch
        feeds = {}
        for bd in p.inputs:
            t, key = bd.tensor, bd.buffer
            if t.role in ("kv_cache",):
                continue
            shape = self.plan.shape(bd, self.bucket, p)
            x = self.view(key, shape)
            x = self._real_rows(x) if t.role == "tokens" else x[:b] if t.role in ("noise_keys", "sampling") else x
            feeds[t.name] = x.cpu().numpy().copy()
        g = m.graphs["generator"]
        for layer, (k, v) in enumerate(self.kv):
            for kind, cache in (("key", k), ("value", v)):
                full = self._real_rows(cache[: m.rows(self.bucket)]).float().cpu().numpy()
                for t in g.inputs:
                    if t.name in (f"past_{kind}_{layer}", f"cache_{kind}_{layer}"):
                        feeds[t.name] = full[:, :, : st.cached].copy() if t.role == "kv_past" else full.copy()
        return feeds

    # ------------------------------------------------------------ graphs as given
    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One exported module in this backend's precision on explicit inputs (parity checks)."""
        torch = self.torch
        module = self.export_graphs[name]
        ins, outs = module.signature()
        args = []
        for t in ins:
            x = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device)
            if x.is_floating_point():
                x = x.to(torch.float32 if t.role in ("images", "sampling") else self.dtype)
            args.append(x)
        with torch.inference_mode():
            res = module(*args)
        res = res if isinstance(res, tuple) else (res,)
        return {t.name: (r.float() if r.is_floating_point() else r).cpu().numpy() for t, r in zip(outs, res)}

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.run_graph("decoder", {"tokens": np.asarray(tokens, dtype=np.int64)})["images"]

    def encode(self, images: np.ndarray) -> np.ndarray:
        if "encoder" not in self.manifest.graphs:
            raise ArtifactError("these artifacts have no encoder graph (exported with --no-encoder); re-export "
                                "without it to encode images")
        return self.run_graph("encoder", {"images": np.asarray(images, dtype=np.float32)})["tokens"]

    def close(self) -> None:
        self.graphs.clear()
        self.logits.clear()
        self.buf, self.host = {}, {}


__all__ = ["CudaBackend", "PRECISIONS", "static_cache_view"]
