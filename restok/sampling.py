"""Token sampling as tensor operations: classifier-free guidance, temperature, top-k, top-p, Gumbel-max.

Written so that the same function runs in the PyTorch reference loop and inside the exported per-step
graphs: no host round trip, no sort of the vocabulary (TensorRT's TopK stops at K = 3840; the vocabulary is
8192), and randomness only from an explicit Gumbel noise input, so every backend draws the same tokens.

Equivalence with the official sampler (sort, cumulative softmax, multinomial): top-k keeps every logit
>= the k-th largest; top-p keeps the tokens whose preceding probability mass (in descending order) is
<= p, found here as a probability threshold by bisection; Gumbel-max then draws exactly from the softmax
of the kept logits. Tied probabilities at the top-p boundary are all kept (the sort keeps an arbitrary
subset of them).
"""

from __future__ import annotations

import torch

TOP_P_ITERATIONS = 64


def apply_cfg(logits: torch.Tensor, cfg_scale: torch.Tensor | float) -> torch.Tensor:
    """Rows [:B] are conditional, [B:] unconditional: u + s * (c - u) (the official order of operations)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + (cond - uncond) * cfg_scale


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest (ties kept), others -> -inf. top_k <= 0 disables."""
    if top_k <= 0:
        return logits
    k = min(int(top_k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float, iterations: int = TOP_P_ITERATIONS) -> torch.Tensor:
    """Nucleus filtering without a sort.

    Keep token j iff the probability mass of tokens strictly more likely than j is <= top_p. The smallest
    kept probability tau is the least t with mass(probs > t) <= top_p; bisection on t keeps
    mass(probs > lo) > top_p >= mass(probs > hi) and ends with lo < tau <= hi, hi and lo adjacent floats
    for any practical tau, so keeping probs > lo keeps exactly probs >= tau.
    """
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    hi = probs.amax(dim=-1, keepdim=True)
    lo = torch.zeros_like(hi)
    p = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device)
    for _ in range(iterations):
        mid = (lo + hi) * 0.5
        mass = torch.where(probs > mid, probs, torch.zeros_like(probs)).sum(dim=-1, keepdim=True)
        ok = mass <= p
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return logits.masked_fill(probs <= lo, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    gumbel: torch.Tensor,
    *,
    cfg_scale: torch.Tensor | float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """logits [2B or B, n, V] -> token ids int64 [B, n].

    ``cfg_scale`` None means no guidance (the batch is not doubled); otherwise the batch is [cond; uncond].
    ``gumbel`` [B, n, V] is Gumbel(0, 1) noise (``restok.noise.gumbel_noise``).
    """
    x = logits.float()
    if cfg_scale is not None:
        x = apply_cfg(x, cfg_scale)
    x = x / max(float(temperature), 1e-5)
    x = top_k_filter(x, top_k)
    x = top_p_filter(x, top_p)
    return torch.argmax(x + gumbel.to(x.dtype), dim=-1)
