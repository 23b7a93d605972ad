"""The modules that become graphs: the generator (one graph for every HAR pass, sampling inside), the
tokenizer decoder and encoder, and the two KV-cache forms the generator graph can be exported with.

Every shape that differs between passes or runs is a graph dimension: the batch, the number of new
positions and the cached length. What a pass needs that used to be baked in as constants (its RoPE
positions, which special-token rows it embeds) is a small input the runtime computes once from
``restok.schedule`` (``HARStep.position_ids``, ``HARStep.embed_sources``). Each module declares its
graph signature (``signature()``, from ``restok.contract``: names, symbolic shapes, dtypes, roles) and the
exporter writes it into the manifest, where the runtime's binding plan reads it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from restok.contract import (KV_CACHES, SAMPLING_INPUTS, TensorSpec, decoder_signature, encoder_signature,
                             generator_signature, rows)
from restok.models.generator import HARGenerator
from restok.models.tokenizer import ResTok
from restok.noise import NOISE_KEYS, check_capacity
from restok.sampling import gumbel_noise, sample_tokens
from restok.schedule import EMBED_CLASS


# --------------------------------------------------------------------------------- KV-cache forms


class ConcatKV:
    """The functional past/present cache: the past comes in as an input and present = past ++ new goes out
    (``present_*`` after pass i is exactly ``past_*`` of pass i+1; the past of pass 0 has length 0)."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.k, self.v = past_k, past_v

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


def tensor_scatter(cache: torch.Tensor, update: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """cache[:, :, start:start+n] = update, functionally (``start`` int64 [1]). Exported as ONNX
    TensorScatter (opset 24), which TensorRT >= 10.15 turns into its in-place KV-cache update layer."""
    if torch.onnx.is_in_onnx_export():
        idx = start.expand(cache.shape[0])
        return torch.onnx.ops.symbolic("TensorScatter", (cache, update, idx), dict(axis=-2, mode="linear"),
                                       dtype=cache.dtype, shape=cache.shape, version=24)
    s = int(start.reshape(-1)[0])
    return torch.cat([cache[:, :, :s], update, cache[:, :, s + update.shape[2]:]], dim=2)


class StaticKV:
    """A preallocated cache [R, H, seq_len, hd] written in place at a pass's positions, ``start`` a Python int
    (each pass is captured as its own CUDA graph): how the CUDA backend runs the generator. The keys a pass
    sees are every position up to its last one, as in the two exported forms."""

    def __init__(self, cache_k: torch.Tensor, cache_v: torch.Tensor):
        self.k, self.v = cache_k, cache_v

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        return self.k[:, :, :end], self.v[:, :, :end]


class ScatterKV:
    """The fixed-size cache: the whole cache [R, H, max_len, hd] comes in, is updated at this pass's positions
    and goes out (bound to the same buffer at run time: an in-place update)."""

    def __init__(self, cache_k: torch.Tensor, cache_v: torch.Tensor):
        self.k, self.v = cache_k, cache_v

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = tensor_scatter(self.k, k, start), tensor_scatter(self.v, v, start)
        return self.k, self.v


# ------------------------------------------------------------------------------------ generator


def _clip_ids(ids: torch.Tensor, size: int) -> torch.Tensor:
    """ids clamped to [0, size) with Where (not clamp: TensorRT's Clip takes floats only, and the exporter's
    optimizer turns integer Max/Min with constants into Clip)."""
    hi = torch.where(ids < size, ids, size - 1)  # Python scalars: no host-to-device copy (CUDA-graph capture)
    return torch.where(hi < 0, 0, hi)



class GeneratorGraph(nn.Module):
    """Any pass of the schedule: embeddings -> transformer over the KV cache -> logits -> sampled tokens.

    Its inputs and outputs are ``restok.contract.generator_signature``. Rows: 2B with guidance (rows B..
    carry the null class), B without. Column p of ``tokens`` holds the class label where ``embed_sources[p]``
    is EMBED_CLASS, the image token where it is EMBED_TOKEN and is ignored at special positions;
    ``positions`` are contiguous and start at the cached length (position p predicts token p);
    ``next_tokens`` holds the B sampled rows, repeated for the unconditional rows. The in-place KV cache is
    updated with TensorScatter.
    """

    def __init__(self, gen: HARGenerator, guided: bool, kv_cache: str = "concat"):
        super().__init__()
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        check_capacity(gen.cfg.block_size, gen.cfg.vocab_size)
        self.gen = gen
        self.guided = guided
        self.kv_cache = kv_cache

    @property
    def num_layers(self) -> int:
        return len(self.gen.layers)

    def signature(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs) with symbolic shapes (``restok.contract.generator_signature``)."""
        cfg = self.gen.cfg
        dt = "float16" if self.gen.tok_embeddings.weight.dtype == torch.float16 else "float32"
        return generator_signature(vocab_size=cfg.vocab_size, num_layers=self.num_layers,
                                   kv_heads=cfg.n_kv_head or cfg.n_head, head_dim=cfg.dim // cfg.n_head,
                                   seq_len=self.gen.schedule.seq_len, kv_dtype=dt, kv_cache=self.kv_cache)

    def example_inputs(self, batch: int = 2, new: int = 4, past: int = 4) -> tuple[torch.Tensor, ...]:
        """Inputs of a made-up pass (sizes >= 2 everywhere, so the exporter keeps every dimension symbolic)."""
        cfg, sched = self.gen.cfg, self.gen.schedule
        R = rows(batch, self.guided)
        w = self.gen.tok_embeddings.weight
        dev, dtype = w.device, w.dtype
        tokens = torch.arange(R * new, device=dev).reshape(R, new) % cfg.vocab_size
        sources = torch.tensor([-1] * (new // 2) + list(range(new - new // 2)), device=dev)
        positions = torch.arange(past, past + new, device=dev)
        keys = torch.arange(batch * NOISE_KEYS, dtype=torch.int32, device=dev).reshape(batch, NOISE_KEYS)
        sampling = (torch.full((batch,), 3.0), torch.ones(batch), torch.zeros(batch, dtype=torch.int64),
                    torch.full((batch,), 0.9))
        kvh, hd = cfg.n_kv_head or cfg.n_head, cfg.dim // cfg.n_head
        length = sched.seq_len if self.kv_cache == "inplace" else past
        kv = tuple(torch.zeros(R, kvh, length, hd, device=dev, dtype=dtype) for _ in range(2 * self.num_layers))
        return (tokens, sources, positions, keys, *[t.to(dev) for t in sampling], *kv)

    def dynamic_shapes(self, max_batch: int) -> tuple:
        """torch.export dimensions of every input, in order: the signature's shape symbols as Dims."""
        from torch.export import Dim

        sched = self.gen.schedule
        batch = Dim("batch", min=1, max=max_batch)
        dims = {"batch": batch, "rows": rows(batch, self.guided), "new": Dim("new", min=1, max=max(sched.new_positions)),
                "past": Dim("past", min=0, max=sched.seq_len - 1)}
        shapes = [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.signature()[0]]
        named = 4 + len(SAMPLING_INPUTS)  # tokens, embed_sources, positions, noise_keys, the sampling inputs
        return (*shapes[:named], tuple(shapes[named:]))  # the KV caches are one positional group (*kv)

    def embed(self, tokens: torch.Tensor, embed_sources: torch.Tensor) -> torch.Tensor:
        """[R, n] ids + [n] sources -> [R, n, dim]: every table is gathered with clamped ids (columns that
        a position does not use may hold anything) and the right one is selected per position."""
        cfg = self.gen.cfg
        cls_table = self.gen.cls_embedding.embedding_table.weight
        spe_table = self.gen.spe_tok_embeddings.special_embeddings.weight
        cls = F.embedding(_clip_ids(tokens, cls_table.shape[0]), cls_table)  # F.embedding: ONNX Gather
        tok = F.embedding(_clip_ids(tokens, cfg.vocab_size), self.gen.tok_embeddings.weight)
        spe = F.embedding(_clip_ids(embed_sources, spe_table.shape[0]), spe_table).unsqueeze(0)
        src = embed_sources.reshape(1, -1, 1)
        return torch.where(src >= 0, spe, torch.where(src == EMBED_CLASS, cls, tok))

    def forward(self, tokens, embed_sources, positions, noise_keys, cfg_scale, temperature, top_k, top_p, *kv):
        gen = self.gen
        h = self.embed(tokens, embed_sources)
        rope = tuple(F.embedding(positions, t) for t in gen.rope_tables(h.device))
        start = positions[:1]
        if self.kv_cache == "inplace":
            caches = [ScatterKV(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]
            # every slot of the fixed-size cache is a key; the ones not written yet (later passes) are masked.
            # A pass sees every position before its last one (HARSchedule.attention_mask); 4-D for TensorRT.
            slots = torch.arange(kv[0].shape[2], device=h.device)
            mask = (slots.unsqueeze(0) <= positions.unsqueeze(1)[-1:]).expand(positions.shape[0], -1)[None, None]
        else:
            caches = [ConcatKV(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]
            mask = None  # past ++ new: every key is visible
        logits = gen.run_layers(h, rope, mask, caches, start)
        noise = gumbel_noise(noise_keys, positions, self.gen.cfg.vocab_size)
        nxt = sample_tokens(logits, noise, cfg_scale=cfg_scale if self.guided else None,
                            temperature=temperature, top_k=top_k, top_p=top_p)
        if self.guided:
            nxt = torch.cat([nxt, nxt], dim=0)
        out = [nxt, logits]
        for c in caches:
            out += [c.k, c.v]
        return tuple(out)


# ------------------------------------------------------------------------------------ tokenizer


class _TokenizerGraph(nn.Module):
    """A tokenizer graph: tokens [B, N] int64 and images [B, 3, S, S] float32, one of them in, the other out."""

    def __init__(self, tok: ResTok):
        super().__init__()
        self.tok = tok

    def dynamic_shapes(self, max_batch: int) -> tuple:
        from torch.export import Dim

        return ({0: Dim("batch", min=1, max=max_batch)},)


class DecoderGraph(_TokenizerGraph):
    """``tokens`` [B, N] int64 -> ``images`` [B, 3, S, S] float32 (not clamped)."""

    def signature(self):
        return decoder_signature(self.tok.cfg.num_latent_tokens, self.tok.cfg.image_size)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        N, V = self.tok.cfg.num_latent_tokens, self.tok.cfg.codebook_size
        return (torch.arange(batch * N).reshape(batch, N) % V,)

    def forward(self, tokens):
        return self.tok.decode_codes(self.tok.quantize.lookup(tokens)).float()


class EncoderGraph(_TokenizerGraph):
    """``images`` [B, 3, S, S] float32 in [0, 1] -> ``tokens`` [B, N] int64."""

    def signature(self):
        return encoder_signature(self.tok.cfg.num_latent_tokens, self.tok.cfg.image_size)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        s = self.tok.cfg.image_size
        return (torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(0)),)

    def forward(self, images):
        dtype = self.tok.pixel_encoder.conv_in.weight.dtype
        return self.tok.encode_codes(images.to(dtype))["ids"]
