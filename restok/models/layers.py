"""Layers shared by the ResTok tokenizer and the LlamaGen/HAR generator.

Module and parameter names follow the official code so that state dicts load with strict key matching.
Numerics follow it too (RoPE angles in float64 for the tokenizer and float32 for the generator, RoPE and
RMSNorm computed in float32), so that outputs agree with the official implementation to float rounding.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def no_autocast(device_type: str):
    """Disable autocast for a region (quantizer, pixel decoder) only when it is on: a no-op otherwise,
    which keeps graph export free of autocast regions."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()

# --------------------------------------------------------------------------------------- RoPE


def rope_2d(ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, head_dim/2] for 2-axis (row, col) positions ``ids`` [N, 2] (Flux-style).

    Each axis gets head_dim/2 channels: rotation pairs 0..head_dim/4-1 use the row id, the rest the column
    id. Angles are computed in float64 and rounded to float32, as the official code does.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    omega = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
    ang = torch.cat([ids[:, i : i + 1].to(torch.float64) * omega[None, :] for i in range(2)], dim=1)
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_1d(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] for positions 0..seq_len-1 (gpt-fast style, float32)."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of ``x`` [..., N, head_dim] by tables [N, head_dim/2]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


# ------------------------------------------------------------------- fp32 islands for fp16 graphs


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (fp16 graphs keep their norms in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention. Exported below float32, the scores and softmax are spelled out in
    float32 (an fp16 graph keeps its softmax in fp32); run eagerly, SDPA, whose fused kernels accumulate the
    softmax in float32 themselves."""
    if q.dtype == torch.float32 or not torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q @ k.transpose(-2, -1)).float() * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v


# ------------------------------------------------------------------------------ tokenizer ViT


class ViTAttention(nn.Module):
    """Multi-head attention with a fused bias-free qkv (q/v biases apart), per-head qk LayerNorm and RoPE."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.q_norm = LayerNorm(head_dim, eps=1e-5)
        self.k_norm = LayerNorm(head_dim, eps=1e-5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm block with layer scale; split in two halves so a token merge can sit between them."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn = ViTAttention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))

    def attend(self, x: torch.Tensor, rope, mask: torch.Tensor | None) -> torch.Tensor:
        return x + self.gamma_1 * self.attn(self.norm1(x), rope, mask)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma_2 * self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.feed_forward(self.attend(x, rope, mask))


# ------------------------------------------------------------------------------ generator GPT


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """A preallocated cache [B, kv_heads, max_len, head_dim]; a pass writes its new positions in place."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.k_cache.shape[2]:
            raise ValueError(f"KV cache of length {self.k_cache.shape[2]} cannot hold positions up to {end}")
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]


class GPTAttention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        if dim % n_head or n_head % n_kv_head:
            raise ValueError(f"dim {dim}, n_head {n_head}, n_kv_head {n_kv_head} do not divide")
        self.dim, self.n_head, self.n_kv_head = dim, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """``mask`` is bool [n, keys]; with a ``cache`` the keys are every cached position plus these."""
        B, N, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = q.view(B, N, self.n_head, self.head_dim)
        k = k.view(B, N, self.n_kv_head, self.head_dim)
        v = v.view(B, N, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = apply_rope(q, cos[:, None], sin[:, None]).transpose(1, 2)
        k = apply_rope(k, cos[:, None], sin[:, None]).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(start, k, v)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = attention(q, k, v, mask, self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, N, self.dim)))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class GPTBlock(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, ffn_hidden, norm_eps, attn_dropout, resid_dropout, ffn_dropout, drop_path):
        super().__init__()
        self.attention = GPTAttention(dim, n_head, n_kv_head, attn_dropout, resid_dropout)
        self.feed_forward = FeedForward(dim, ffn_hidden, ffn_dropout)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, mask, cache, start))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))
