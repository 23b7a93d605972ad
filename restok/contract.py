"""The graph I/O contract: every tensor the exported graphs take and give, stated once. No torch.

Each tensor has a name, a role (what it is for), a dtype and a shape over the symbols below. The export
modules declare their graph signatures with the functions here and the exporter checks the written ONNX
against them; the manifest records the signatures; the runtime's binding plan, every backend and the
TensorRT builder read them back from the manifest and resolve shapes with ``pass_dims``/``batch_dims``.
Nothing outside this module spells a tensor name, a role set or a shape symbol.

Shape symbols: ``batch`` (images in a run, 1..max_batch), ``rows`` (generator rows: 2 x batch with
guidance, the unconditional rows last; batch without), ``new`` (positions computed by a pass), ``past``
(positions cached before it, past/present form) and ``total`` (past + new).
"""

from __future__ import annotations

from dataclasses import dataclass

from restok.noise import NOISE_KEYS
from restok.schedule import HARStep

__all__ = [
    "ArtifactError", "GraphSpec", "TensorSpec", "KV_CACHES", "ROLES", "SAMPLING_INPUTS", "SYMBOLS",
    "batch_dims", "decoder_signature", "encoder_signature", "generator_signature", "pass_dims", "rows",
]

SYMBOLS = ("batch", "rows", "new", "past", "total")
KV_CACHES = ("concat", "inplace")  # past/present per pass | one fixed-size cache updated in place

# roles of graph tensors (TensorSpec.role)
ROLES = (
    "tokens",  # generator: ids to embed [rows, new]; decoder: image tokens [batch, N]; encoder output
    "embed_sources",  # generator: what each new position embeds (HARStep.embed_sources)
    "positions",  # generator: RoPE positions of the new positions (HARStep.position_ids)
    "noise_keys",  # generator: each image's keys of the in-graph Gumbel generator (restok.noise)
    "sampling",  # generator: a per-image sampling parameter (SAMPLING_INPUTS)
    "kv_past", "kv_present",  # past/present KV cache: present of pass i feeds past of pass i+1
    "kv_cache", "kv_cache_out",  # fixed-size KV cache updated in place: the output aliases the input
    "next_tokens", "logits",  # generator outputs
    "images",  # decoder output, encoder input
)
GENERATOR_INPUT_ROLES = frozenset({"tokens", "embed_sources", "positions", "noise_keys", "sampling", "kv_past",
                                   "kv_cache"})
GENERATOR_OUTPUT_ROLES = frozenset({"next_tokens", "logits", "kv_present", "kv_cache_out"})
# the generator's per-image sampling inputs, in graph order, with their dtypes (cfg_scale is per pass too)
SAMPLING_INPUTS = {"cfg_scale": "float32", "temperature": "float32", "top_k": "int64", "top_p": "float32"}


class ArtifactError(ValueError):
    """Artifacts are missing, damaged or from another version; the message says what to rebuild."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` holds ints and shape symbols (``SYMBOLS``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: float32, float16, int64
    role: str = ""
    feeds: str | None = None  # kv_present: the input of the next pass it becomes
    aliases: str | None = None  # kv_cache_out: the input whose buffer it updates in place

    def __post_init__(self) -> None:
        bad = [d for d in self.shape if isinstance(d, str) and d not in SYMBOLS]
        if bad or (self.role and self.role not in ROLES):
            raise ArtifactError(f"tensor {self.name}: unknown shape symbol {bad} or role {self.role!r}; re-export")

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(x if isinstance(x, str) else int(x) for x in d["shape"]), d["dtype"],
                   d.get("role", ""), d.get("feeds"), d.get("aliases"))

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "role": self.role}
        for k in ("feeds", "aliases"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        return d

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape for symbol values ``dims`` (``pass_dims`` or ``batch_dims``)."""
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str  # generator, decoder, encoder
    file: str  # relative to the export folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = 0

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "GraphSpec":
        return cls(name, d["file"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]), int(d.get("opset", 0)))

    def to_dict(self) -> dict:
        return {"file": self.file, "opset": self.opset, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no input {name!r}")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no output {name!r}")

    def with_role(self, role: str, outputs: bool = False) -> list[TensorSpec]:
        return [t for t in (self.outputs if outputs else self.inputs) if t.role == role]

    def check_generator_roles(self) -> None:
        """Roles this runtime knows, exactly one of each single input, known sampling inputs."""
        unknown = [t.name for t in self.inputs if t.role not in GENERATOR_INPUT_ROLES]
        unknown += [t.name for t in self.outputs if t.role not in GENERATOR_OUTPUT_ROLES]
        if unknown:
            raise ArtifactError(f"generator tensors {unknown} have roles this runtime does not know; re-export "
                                "the artifacts with this restok")
        roles = [t.role for t in self.inputs]
        for need in ("tokens", "embed_sources", "positions", "noise_keys"):
            if roles.count(need) != 1:
                raise ArtifactError(f"the generator graph has {roles.count(need)} {need!r} inputs; re-export")
        bad = [t.name for t in self.inputs if t.role == "sampling" and t.name not in SAMPLING_INPUTS]
        if bad:
            raise ArtifactError(f"unknown sampling inputs {bad}; re-export the artifacts with this restok")


# ----------------------------------------------------------------------------------- dimensions


def rows(batch: int, guided: bool) -> int:
    """Generator rows for ``batch`` images: doubled when guidance is exported (unconditional rows last)."""
    return 2 * batch if guided else batch


def pass_dims(step: HARStep, batch: int, guided: bool) -> dict[str, int]:
    """The generator's symbol values in pass ``step`` for a run of ``batch`` images."""
    return {"batch": batch, "rows": rows(batch, guided), "new": step.num_new, "past": step.cached,
            "total": step.total}


def batch_dims(batch: int) -> dict[str, int]:
    """The tokenizer graphs' symbol values for ``batch`` images."""
    return {"batch": batch}


# ----------------------------------------------------------------------------------- signatures


def generator_signature(*, vocab_size: int, num_layers: int, kv_heads: int, head_dim: int, seq_len: int,
                        kv_dtype: str, kv_cache: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the generator graph, in graph order.

    Inputs: ``tokens`` int64 [rows, new], ``embed_sources`` and ``positions`` int64 [new], ``noise_keys``
    int32 [batch, NOISE_KEYS], the per-image ``SAMPLING_INPUTS`` [batch], then per layer the KV cache:
    ``past_{key,value}_{l}`` [rows, H, past, hd] (concat) or ``cache_{key,value}_{l}`` [rows, H, seq_len, hd]
    (inplace). Outputs: ``next_tokens`` int64 [rows, new], ``logits`` float32 [rows, new, V], then
    ``present_*`` [rows, H, total, hd] (feeding the next pass's ``past_*``) or ``cache_*_out`` (aliasing
    ``cache_*``)."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    ins = [TensorSpec("tokens", ("rows", "new"), "int64", "tokens"),
           TensorSpec("embed_sources", ("new",), "int64", "embed_sources"),
           TensorSpec("positions", ("new",), "int64", "positions"),
           TensorSpec("noise_keys", ("batch", NOISE_KEYS), "int32", "noise_keys")]
    ins += [TensorSpec(n, ("batch",), dt, "sampling") for n, dt in SAMPLING_INPUTS.items()]
    outs = [TensorSpec("next_tokens", ("rows", "new"), "int64", "next_tokens"),
            TensorSpec("logits", ("rows", "new", vocab_size), "float32", "logits")]
    layers = [(i, kv) for i in range(num_layers) for kv in ("key", "value")]
    if kv_cache == "inplace":
        shape = ("rows", kv_heads, seq_len, head_dim)
        ins += [TensorSpec(f"cache_{kv}_{i}", shape, kv_dtype, "kv_cache") for i, kv in layers]
        outs += [TensorSpec(f"cache_{kv}_out_{i}", shape, kv_dtype, "kv_cache_out", aliases=f"cache_{kv}_{i}")
                 for i, kv in layers]
    else:
        ins += [TensorSpec(f"past_{kv}_{i}", ("rows", kv_heads, "past", head_dim), kv_dtype, "kv_past")
                for i, kv in layers]
        outs += [TensorSpec(f"present_{kv}_{i}", ("rows", kv_heads, "total", head_dim), kv_dtype, "kv_present",
                            feeds=f"past_{kv}_{i}") for i, kv in layers]
    return tuple(ins), tuple(outs)


def _tokenizer_specs(num_tokens: int, image_size: int) -> tuple[TensorSpec, TensorSpec]:
    return (TensorSpec("tokens", ("batch", num_tokens), "int64", "tokens"),
            TensorSpec("images", ("batch", 3, image_size, image_size), "float32", "images"))


def decoder_signature(num_tokens: int, image_size: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """``tokens`` int64 [batch, N] -> ``images`` float32 [batch, 3, S, S] (not clamped)."""
    tokens, images = _tokenizer_specs(num_tokens, image_size)
    return (tokens,), (images,)


def encoder_signature(num_tokens: int, image_size: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """``images`` float32 [batch, 3, S, S] in [0, 1] -> ``tokens`` int64 [batch, N]."""
    tokens, images = _tokenizer_specs(num_tokens, image_size)
    return (images,), (tokens,)
