"""The modules that become graphs: one per HAR step (with sampling inside), the tokenizer decoder and encoder.

Each module has fixed input shapes (a static graph per step: new positions and cached length are
constants), takes everything that varies at run time as an input (token ids, KV cache, noise, CFG scale,
temperature, top-k, top-p) and bakes the rest (mask rows, RoPE tables) in as constants.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from restok.models.generator import HARGenerator
from restok.models.layers import ConcatKV, ScatterKV
from restok.models.tokenizer import ResTok
from restok.sampling import sample_tokens
from restok.schedule import HARSchedule

SAMPLING_INPUTS = ("cfg_scale", "temperature", "top_k", "top_p")
KV_CACHES = ("concat", "inplace")


class GeneratorStepGraph(nn.Module):
    """One pass of the schedule: embeddings -> transformer over the KV cache -> logits -> sampled tokens.

    Inputs: ``labels`` [R] (step 0) or ``tokens`` [R, n_in] (the previous pass's ``next_tokens``),
    ``noise`` [B, n, V] Gumbel, ``cfg_scale``/``temperature``/``top_p`` float32 [1], ``top_k`` int64 [1],
    then ``past_key_{l}``/``past_value_{l}`` [R, H, cached, hd] per layer (none for step 0).
    Outputs: ``next_tokens`` [R, n] (duplicated for the unconditional rows, so it feeds the next pass
    as is), ``logits`` [R, n, V] float32, ``present_key_{l}``/``present_value_{l}`` [R, H, cached+n, hd].
    R = 2B with guidance (rows B.. carry the null class), B without.

    With ``kv_cache="inplace"`` every pass instead takes the whole fixed-size cache ``cache_key_{l}`` /
    ``cache_value_{l}`` [R, H, seq_len, hd], writes its positions with ONNX TensorScatter and returns it as
    ``cache_key_out_{l}`` / ``cache_value_out_{l}``: a runtime binds input and output to one buffer, and
    attention runs over all slots with the unwritten ones masked.
    """

    def __init__(self, gen: HARGenerator, schedule: HARSchedule, index: int, guided: bool, kv_cache: str = "concat"):
        super().__init__()
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        self.gen = gen
        self.schedule = schedule
        self.step = schedule.steps[index]
        self.guided = guided
        self.kv_cache = kv_cache

    @property
    def num_layers(self) -> int:
        return len(self.gen.layers)

    def input_names(self) -> list[str]:
        first = "labels" if self.step.class_input else "tokens"
        if self.kv_cache == "inplace":
            past = [f"cache_{kv}_{i}" for i in range(self.num_layers) for kv in ("key", "value")]
        else:
            past = [f"past_{kv}_{i}" for i in range(self.num_layers) for kv in ("key", "value")] if self.step.cached else []
        return [first, "noise", *SAMPLING_INPUTS, *past]

    def output_names(self) -> list[str]:
        fmt = "cache_{kv}_out_{i}" if self.kv_cache == "inplace" else "present_{kv}_{i}"
        return ["next_tokens", "logits", *[fmt.format(kv=kv, i=i) for i in range(self.num_layers) for kv in ("key", "value")]]

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        st, cfg = self.step, self.gen.cfg
        R = 2 * batch if self.guided else batch
        dev, dtype = self.gen.tok_embeddings.weight.device, self.gen.tok_embeddings.weight.dtype
        if st.class_input:
            first = torch.arange(R, device=dev) % cfg.num_classes
        else:
            first = torch.arange(R * len(st.token_inputs), device=dev).reshape(R, -1) % cfg.vocab_size
        noise = torch.zeros(batch, st.num_new, cfg.vocab_size, device=dev)
        scalars = (torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.9]))
        hd = cfg.dim // cfg.n_head
        kvh = cfg.n_kv_head or cfg.n_head
        if self.kv_cache == "inplace":
            past = tuple(torch.zeros(R, kvh, self.schedule.seq_len, hd, device=dev, dtype=dtype) for _ in range(2 * self.num_layers))
        else:
            past = tuple(torch.zeros(R, kvh, st.cached, hd, device=dev, dtype=dtype)
                         for _ in range(2 * self.num_layers)) if st.cached else ()
        return (first, noise, *[t.to(dev) for t in scalars], *past)

    def forward(self, first, noise, cfg_scale, temperature, top_k, top_p, *past):
        st = self.step
        if st.class_input:
            h = self.gen.embed_step(st, None, first)
        else:
            h = self.gen.embed_step(st, first, None)
        if self.kv_cache == "inplace":
            caches = [ScatterKV(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
            # every slot is a key; the unwritten ones (later passes) are masked. 4-D for TensorRT's Attention.
            mask = self.gen._mask(self.schedule, h.device)[..., st.cached : st.total, :]
        else:
            caches = [ConcatKV(past[2 * i], past[2 * i + 1]) if past else ConcatKV() for i in range(self.num_layers)]
            mask = self.gen._mask(self.schedule, h.device)[..., st.cached : st.total, : st.total]
        logits = self.gen._run(h, slice(st.cached, st.total), mask, caches, st.cached)
        nxt = sample_tokens(logits, noise, cfg_scale=cfg_scale if self.guided else None,
                            temperature=temperature, top_k=top_k, top_p=top_p)
        if self.guided:
            nxt = torch.cat([nxt, nxt], dim=0)
        out = [nxt, logits]
        for c in caches:
            out += [c.k, c.v]
        return tuple(out)


class DecoderGraph(nn.Module):
    """``tokens`` [B, N] int64 -> ``images`` [B, 3, S, S] float32 (not clamped)."""

    def __init__(self, tok: ResTok):
        super().__init__()
        self.tok = tok

    def input_names(self) -> list[str]:
        return ["tokens"]

    def output_names(self) -> list[str]:
        return ["images"]

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        N, V = self.tok.cfg.num_latent_tokens, self.tok.cfg.codebook_size
        return (torch.arange(batch * N).reshape(batch, N) % V,)

    def forward(self, tokens):
        return self.tok.decode_codes(self.tok.quantize.lookup(tokens)).float()


class EncoderGraph(nn.Module):
    """``images`` [B, 3, S, S] float32 in [0, 1] -> ``tokens`` [B, N] int64."""

    def __init__(self, tok: ResTok):
        super().__init__()
        self.tok = tok

    def input_names(self) -> list[str]:
        return ["images"]

    def output_names(self) -> list[str]:
        return ["tokens"]

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        s = self.tok.cfg.image_size
        return (torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(0)),)

    def forward(self, images):
        dtype = self.tok.pixel_encoder.conv_in.weight.dtype
        return self.tok.encode_codes(images.to(dtype))["ids"]
