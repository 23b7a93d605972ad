"""The binding plan: the manifest's graph I/O contract turned into buffers and per-pass bindings. No torch.

Every backend allocates the plan's buffers once (sized for ``max_batch``) and binds, for pass i and a run
of b images, each graph tensor to a prefix of its buffer with the shape the plan resolves (the shape
symbols of ``restok.contract``, through ``pass_dims``/``batch_dims``). Nothing here parses tensor names: what a tensor
is comes from its role, and which output feeds or aliases which input from the manifest.

Buffers (key: shape at max batch):
- ``tokens.i`` [rows, new_i]: pass 0's holds the class labels (host input); pass i > 0's first columns
  receive pass i-1's ``next_tokens`` (a device copy, ``PassPlan.tokens_from``).
- ``embed_sources.i``, ``positions.i`` [new_i]: constants from the schedule, written once.
- ``noise_keys`` [batch, 8], ``cfg_scale.i`` [batch], ``temperature``/``top_k``/``top_p`` [batch]: host
  inputs, written once per run (32 bytes of noise keys and 52 bytes of settings per image).
- KV: ``kv.NAME`` [rows, H, seq_len, hd] (in place: one buffer, input and output of every pass) or
  ``kv.i.NAME`` [rows, H, total_i, hd] per pass (past/present: pass i's present is pass i+1's past; pass
  0's past has length 0).
- ``next_tokens.i`` [rows, new_i]; ``logits`` [rows, max new, V] (one buffer: read right after a pass);
  ``decoder.tokens`` [batch, N] (gathered from every pass), ``decoder.images`` [batch, 3, S, S].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from restok.contract import ArtifactError, TensorSpec, batch_dims, pass_dims
from restok.manifest import Manifest, np_dtype
from restok.schedule import HARStep

HOST_INPUT, CONSTANT, STATE = "host_input", "constant", "state"


@dataclass(frozen=True)
class Buffer:
    key: str
    shape: tuple[int, ...]  # at max batch
    dtype: np.dtype
    kind: str  # HOST_INPUT (written per run), CONSTANT (written once), STATE (written by the graphs)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class Binding:
    tensor: TensorSpec
    buffer: str


@dataclass(frozen=True)
class PassPlan:
    step: HARStep
    inputs: tuple[Binding, ...]
    outputs: tuple[Binding, ...]
    tokens_from: str | None  # the previous pass's next_tokens buffer, copied into this pass's tokens[:, :width]
    tokens_width: int

    @property
    def index(self) -> int:
        return self.step.index


@dataclass(frozen=True)
class RunInputs:
    """One run's host inputs (b images); the pipeline builds it, every backend writes it the same way."""

    labels: np.ndarray  # int64 [b]
    noise_keys: np.ndarray  # int32 [b, NOISE_KEYS]
    cfg_scales: np.ndarray  # float32 [num_steps, b]: 1.0 where an image is not guided
    temperature: np.ndarray  # float32 [b]
    top_k: np.ndarray  # int64 [b]
    top_p: np.ndarray  # float32 [b]

    @property
    def batch(self) -> int:
        return int(self.labels.shape[0])

    @property
    def needs_top_k(self) -> bool:
        """Some image keeps only its top k tokens (else the sampler may skip the top-k filter)."""
        return bool((self.top_k > 0).any())

    @property
    def needs_top_p(self) -> bool:
        """Some image keeps a nucleus below mass 1 (else the sampler may skip the top-p filter)."""
        return bool((self.top_p < 1.0).any())

    def padded(self, batch: int) -> "RunInputs":
        """This run with images appended up to ``batch`` (class 0, no guidance, no filters, zero keys): the
        inputs of a captured graph for a larger batch, whose extra images are computed and thrown away.
        Every image is computed on its own row, so the real images do not depend on the padding."""
        extra = batch - self.batch
        if extra < 0:
            raise ValueError(f"cannot pad a run of {self.batch} images to {batch}")
        if extra == 0:
            return self
        pad = lambda a, v: np.concatenate([a, np.full((extra, *a.shape[1:]), v, a.dtype)])  # noqa: E731
        return RunInputs(pad(self.labels, 0), pad(self.noise_keys, 0),
                         np.concatenate([self.cfg_scales, np.ones((self.cfg_scales.shape[0], extra), np.float32)], 1),
                         pad(self.temperature, 1.0), pad(self.top_k, 0), pad(self.top_p, 1.0))


@dataclass
class BindingPlan:
    manifest: Manifest
    buffers: dict[str, Buffer] = field(default_factory=dict)
    passes: list[PassPlan] = field(default_factory=list)
    decoder: tuple[tuple[Binding, ...], tuple[Binding, ...]] = ((), ())

    def __post_init__(self) -> None:
        m = self.manifest
        self.schedule = m.har_schedule()
        self.max_batch = m.max_batch
        g = m.graphs["generator"]
        g.check_generator_roles()
        B = m.max_batch
        n_max = max(st.num_new for st in self.schedule.steps)
        present_of: dict[str, str] = {}  # past input name -> buffer of the previous pass's present output
        prev_tokens: tuple[str, int] | None = None
        for st in self.schedule.steps:
            i = st.index
            dims = pass_dims(st, B, m.guided)
            ins, outs = [], []
            for t in g.inputs:
                if t.role == "tokens":
                    key = self._add(f"tokens.{i}", t, dims, HOST_INPUT if i == 0 else STATE)
                elif t.role in ("embed_sources", "positions"):
                    key = self._add(f"{t.role}.{i}", t, dims, CONSTANT)
                elif t.role == "noise_keys":
                    key = self._add("noise_keys", t, dims, HOST_INPUT)
                elif t.role == "sampling":
                    key = self._add(f"cfg_scale.{i}" if t.name == "cfg_scale" else t.name, t, dims, HOST_INPUT)
                elif t.role == "kv_cache":
                    key = self._add(f"kv.{t.name}", t, dims, STATE)
                else:  # kv_past
                    key = present_of.get(t.name) or self._add(f"kv.empty.{t.name}", t, dims, STATE)
                ins.append(Binding(t, key))
            present_of = {}
            for t in g.outputs:
                if t.role == "kv_cache_out":
                    key = f"kv.{t.aliases}"
                    if key not in self.buffers or g.input(t.aliases).shape != t.shape:
                        raise ArtifactError(f"{t.name} aliases {t.aliases!r}, which is not a cache input of the same "
                                            "shape; re-export the artifacts")
                elif t.role == "kv_present":
                    key = self._add(f"kv.{i}.{t.name}", t, dims, STATE)
                    present_of[t.feeds] = key
                elif t.role == "logits":
                    key = self._add("logits", t, {**dims, "new": n_max}, STATE)
                else:  # next_tokens
                    key = self._add(f"next_tokens.{i}", t, dims, STATE)
                outs.append(Binding(t, key))
            self.passes.append(PassPlan(st, tuple(ins), tuple(outs), prev_tokens and prev_tokens[0],
                                        prev_tokens[1] if prev_tokens else 0))
            prev_tokens = (f"next_tokens.{i}", st.num_new)
            nxt = self.schedule.steps[i + 1] if i + 1 < len(self.schedule.steps) else None
            if nxt is not None and len(nxt.token_inputs) != st.num_new:
                raise ArtifactError("the schedule's passes do not chain (a pass must embed all of the previous "
                                    "pass's predictions); re-export with this restok")
        # the host inputs, once per buffer (temperature, top_k, top_p and the noise keys serve every pass)
        self.host_inputs: dict[str, tuple[Binding, PassPlan]] = {}
        for p in self.passes:
            for bd in p.inputs:
                if self.buffers[bd.buffer].kind == HOST_INPUT:
                    self.host_inputs.setdefault(bd.buffer, (bd, p))
        dec = m.graphs["decoder"]
        ddims = batch_dims(B)
        self.decoder = (tuple(Binding(t, self._add(f"decoder.{t.name}", t, ddims, STATE)) for t in dec.inputs),
                        tuple(Binding(t, self._add(f"decoder.{t.name}", t, ddims, STATE)) for t in dec.outputs))

    # ------------------------------------------------------------------ setup
    def _add(self, key: str, t: TensorSpec, dims: dict[str, int], kind: str) -> str:
        buf = Buffer(key, t.resolve(dims), np_dtype(t.dtype), kind)
        have = self.buffers.get(key)
        if have is not None and (have.shape != buf.shape or have.dtype != buf.dtype):
            raise ArtifactError(f"{t.name}: buffer {key} is {have.shape} {have.dtype} in one pass and "
                                f"{buf.shape} {buf.dtype} in another; re-export the artifacts")
        self.buffers[key] = buf
        return key

    # ------------------------------------------------------------------- use
    def check_batch(self, batch: int) -> None:
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"a run takes 1..{self.max_batch} images (the export's --max-batch); got {batch}")

    def shape(self, binding: Binding, batch: int, p: PassPlan | None = None) -> tuple[int, ...]:
        """The concrete shape of ``binding`` in pass ``p`` (None: the decoder) for a run of ``batch`` images."""
        m = self.manifest
        return binding.tensor.resolve(pass_dims(p.step, batch, m.guided) if p is not None else batch_dims(batch))

    def constants(self) -> dict[str, np.ndarray]:
        """Values of the CONSTANT buffers (per-pass positions and embed sources)."""
        out = {}
        for p in self.passes:
            for b in p.inputs:
                if b.tensor.role == "embed_sources":
                    out[b.buffer] = p.step.embed_sources
                elif b.tensor.role == "positions":
                    out[b.buffer] = p.step.position_ids
        return out

    def host_values(self, run: RunInputs) -> dict[str, np.ndarray]:
        """Values of the HOST_INPUT buffers for ``run`` (each the prefix of its buffer for run.batch images)."""
        m = self.manifest
        b = run.batch
        labels = run.labels.astype(np.int64)
        if m.guided:
            labels = np.concatenate([labels, np.full(b, m.null_class, dtype=np.int64)])
        out = {}
        for key, (bd, p) in self.host_inputs.items():
            role, dtype = bd.tensor.role, self.buffers[key].dtype
            if role == "tokens":  # pass 0: the class labels in every column
                out[key] = np.repeat(labels[:, None], p.step.num_new, axis=1)
            elif role == "noise_keys":
                out[key] = np.ascontiguousarray(run.noise_keys, dtype=dtype)
            else:  # sampling
                v = {"cfg_scale": run.cfg_scales[p.index], "temperature": run.temperature,
                     "top_k": run.top_k, "top_p": run.top_p}[bd.tensor.name]
                out[key] = np.asarray(v, dtype=dtype)
        return out

    def host_bytes(self, batch: int) -> int:
        """Bytes of host inputs for one run of ``batch`` images (what crosses to the device per run)."""
        return sum(int(np.prod(self.shape(bd, batch, p))) * self.buffers[key].dtype.itemsize
                   for key, (bd, p) in self.host_inputs.items())
