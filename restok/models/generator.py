"""LlamaGen class-conditional GPT with hierarchical AR (HAR), checkpoint-compatible with the official code.

The model is a plain Llama-style decoder (RMSNorm, SwiGLU, 1D RoPE, no biases). What makes it HAR is only
the input layout and the attention mask, both taken from ``restok.schedule.HARSchedule``: teacher forcing
runs the whole layout at once; inference runs one pass per schedule step over a KV cache. Any generator
also runs as vanilla AR by passing the vanilla schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from restok.configs import config_from_dict
from restok.models.layers import GPTBlock, KVCache, RMSNorm, find_multiple, rope_1d
from restok.schedule import HARSchedule, HARStep


@dataclass
class GeneratorConfig:
    """Architecture of the generator; field names follow the official ``ModelArgs``. Defaults: GPT-L HAR."""

    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    vocab_size: int = 8192
    cls_token_num: int = 1
    block_size: int = 128
    ar_token_num: int = 4
    spe_token_num: int = 127

    def __post_init__(self) -> None:
        HARSchedule(self.block_size, self.ar_token_num, self.cls_token_num)  # validates
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int:
        """Label of the unconditional row used by classifier-free guidance."""
        return self.num_classes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        return config_from_dict(cls, d, "generator config")


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (the null class) when class dropout is enabled."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.dropout_prob_in_forward = True  # trainers may drop classes themselves (reproducibly per sample)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0 and self.dropout_prob_in_forward:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class SpecialTokenEmbedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(num, dim)


class HARGenerator(nn.Module):
    """Public API: ``gen(ids, labels) -> logits [B, N, vocab]`` (teacher forcing over the HAR layout)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = HARSchedule(cfg.block_size, cfg.ar_token_num, cfg.cls_token_num)
        kv_heads = cfg.n_kv_head or cfg.n_head
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.spe_tok_embeddings = SpecialTokenEmbedding(cfg.spe_token_num, cfg.dim)
        dpr = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(
            [
                GPTBlock(cfg.dim, cfg.n_head, kv_heads, cfg.ffn_hidden, cfg.norm_eps, cfg.attn_dropout_p,
                         cfg.resid_dropout_p, cfg.ffn_dropout_p, dpr[i])
                for i in range(cfg.n_layer)
            ]
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        needed = self.schedule.num_special_tokens_used
        if cfg.spe_token_num < needed:
            raise ValueError(f"spe_token_num={cfg.spe_token_num} but the schedule uses {needed} special tokens")
        self._tables: dict = {}
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: N(0, 0.02) for linears and embeddings, a zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(self.output.weight)

    # ------------------------------------------------------------------ helpers
    def vanilla_schedule(self) -> HARSchedule:
        return self.schedule.vanilla()

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [seq_len, head_dim/2] for every sequence position (index them with a pass's positions)."""
        key = ("rope", str(device))
        if key not in self._tables:
            cos, sin = rope_1d(self.schedule.seq_len, self.cfg.dim // self.cfg.n_head, self.cfg.rope_base)
            self._tables[key] = (cos.to(device), sin.to(device))
        return self._tables[key]

    def _mask(self, schedule: HARSchedule, device) -> torch.Tensor:
        """bool [1, 1, seq_len, seq_len] (4-D, as TensorRT's Attention requires of exported masks)."""
        key = ("mask", schedule, str(device))
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(schedule.attention_mask).to(device)[None, None]
        return self._tables[key]

    def check_labels(self, labels: torch.Tensor, allow_null: bool = False) -> None:
        hi = self.cfg.num_classes + (1 if allow_null and self.cfg.class_dropout_prob > 0 else 0)
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor [B]; got {getattr(labels, 'shape', labels)!r}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= hi):
            raise ValueError(
                f"class labels must lie in [0, {hi}) for this generator ({self.cfg.num_classes} classes); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )

    def check_ids(self, ids: torch.Tensor) -> None:
        V, N = self.cfg.vocab_size, self.cfg.block_size
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[1] != N or ids.is_floating_point():
            raise ValueError(f"token ids must be an integer tensor [B, {N}]; got {getattr(ids, 'shape', ids)!r}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V}); got values in [{int(ids.min())}, {int(ids.max())}]")

    # ---------------------------------------------------------------- embedding
    def embed_step(self, step: HARStep, tokens: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings [B, step.num_new, dim] of one pass.

        ``tokens`` [B, len(step.token_inputs)] are the ids of exactly the tokens the step embeds (the
        previous pass's predictions); ``labels`` [B] are used by the prefill step only.
        """
        parts = []
        if step.class_input:
            parts.append(self.cls_embedding(labels))
        if step.token_inputs:
            parts.append(self.tok_embeddings(tokens))
        if step.special_inputs:
            rows = self.spe_tok_embeddings.special_embeddings.weight[step.special_inputs[0] : step.special_inputs[-1] + 1]
            B = parts[0].shape[0]
            parts.append(rows.unsqueeze(0).expand(B, -1, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def run_layers(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                   caches=None, start=0) -> torch.Tensor:
        """Embeddings [B, n, dim] -> logits [B, n, vocab] (float32). ``rope``: cos/sin rows of the n positions;
        ``caches``: one per layer (``update(start, k, v)`` returns every key/value the pass attends to)."""
        h = self.tok_dropout(h)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i], start)
        # a model whose head was kept in the wider dtype (the CUDA backend's bf16/fp16) normalizes in it too
        return self.output(self.norm(h.to(self.output.weight.dtype))).float()

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor, labels: torch.Tensor, schedule: HARSchedule | None = None) -> torch.Tensor:
        """Teacher forcing: ids [B, N], labels [B] -> logits [B, N, vocab] (float32); logits[:, i] predict ids[:, i]."""
        schedule = schedule or self.schedule
        self.check_ids(ids)
        self.check_labels(labels, allow_null=True)
        h = torch.cat([self.embed_step(s, ids[:, list(s.token_inputs)], labels) for s in schedule.steps], dim=1)
        return self.run_layers(h, self.rope_tables(h.device), self._mask(schedule, ids.device))

    def new_kv_caches(self, batch: int, schedule: HARSchedule | None = None, device=None, dtype=None) -> list[KVCache]:
        """One preallocated cache per layer, long enough for the whole schedule."""
        schedule = schedule or self.schedule
        w = self.tok_embeddings.weight
        kv_heads = self.cfg.n_kv_head or self.cfg.n_head
        return [
            KVCache(batch, kv_heads, schedule.seq_len, self.cfg.dim // self.cfg.n_head, dtype or w.dtype, device or w.device)
            for _ in self.layers
        ]

    def forward_step(
        self,
        step: HARStep,
        tokens: torch.Tensor | None,
        labels: torch.Tensor | None,
        caches: list[KVCache],
        schedule: HARSchedule | None = None,
    ) -> torch.Tensor:
        """One inference pass over the KV cache -> logits [B, step.num_new, vocab] (float32)."""
        schedule = schedule or self.schedule
        h = self.embed_step(step, tokens, labels)
        mask = self._mask(schedule, h.device)[..., step.cached : step.total, : step.total]
        cos, sin = self.rope_tables(h.device)
        rope = (cos[step.cached : step.total], sin[step.cached : step.total])
        return self.run_layers(h, rope, mask, caches, step.cached)


__all__ = ["GeneratorConfig", "HARGenerator"]
