"""Token sampling as tensor operations: classifier-free guidance, temperature, top-k, top-p, Gumbel-max.

The same functions run in the PyTorch reference loop and inside the exported generator graph, where every
sampling parameter is a per-image graph input (shape [B]): no host round trip, no sort and no TopK
(TensorRT's TopK stops at K = 3840; the vocabulary is 8192), and randomness only from the counter-based
generator of ``gumbel_noise`` keyed per image (``restok.noise``), so every backend draws the same tokens
from the same seed.

Equivalence with the official sampler (sort, cumulative softmax, multinomial): top-k keeps every logit
>= the k-th largest; top-p keeps the tokens whose preceding probability mass (in descending order) is
<= p. Both thresholds are found by bisection on the logits shifted to a maximum of 0: 40 halvings of
the logit range leave a bracket far narrower than the float spacing of any threshold not within ~1e-4 of
the maximum, so the kept sets are the official ones (closer to the maximum, only logits within 1e-10 of
the threshold, i.e. ties, could be added). Tied values at a boundary are all kept, and top-p sums
probabilities in another order than a sorted cumulative sum, so a token whose preceding mass is within
float rounding of p may be kept where the official drops it.

Gumbel-max then draws exactly from the softmax of the kept logits; unlike an inverse-CDF draw, its choice
moves only when the two best noisy logits swap, so float rounding differences between backends and
precisions rarely change a token (``restok.noise`` says what was measured).
"""

from __future__ import annotations

import torch

from restok.noise import NOISE_PRIME, NOISE_ROUNDS, UNIFORM_MAX

BISECTION_STEPS = 40


def _param(value, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Python number, a one-element tensor or one value per row ([B]) -> broadcastable over ``like``'s rows."""
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return t.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.ndim - 1)))


def apply_cfg(logits: torch.Tensor, cfg_scale) -> torch.Tensor:
    """Rows [:B] conditional, [B:] unconditional -> u + s * (c - u), the official order of operations.

    ``cfg_scale`` is one value or one per image ([B]); a scale of exactly 1 returns the conditional
    logits (what an unguided run computes)."""
    cond, uncond = logits.reshape(2, -1, *logits.shape[1:]).unbind(0)  # not chunk(): keeps the batch symbolic
    s = _param(cfg_scale, cond, logits.dtype)
    return torch.where(s == 1.0, cond, uncond + (cond - uncond) * s)


def _bracket(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits shifted so the max is 0, and a bracket [lo, hi] = [min - 1, 0] (-inf entries ignored)."""
    xs = x - x.amax(dim=-1, keepdim=True)
    lo = xs.masked_fill(torch.isinf(xs), 0.0).amin(dim=-1, keepdim=True) - 1.0
    return xs, lo, lo * 0.0


def top_k_filter(x: torch.Tensor, top_k) -> torch.Tensor:
    """Keep values >= the k-th largest along the last axis (ties kept), others -> -inf; k <= 0 keeps all.

    Bisection for the least t with count(x > t) < k (the k-th largest value); ``lo`` always satisfies
    count(x > lo) >= k, so keeping x > lo never keeps fewer than k."""
    if isinstance(top_k, int) and top_k <= 0:
        return x
    V = x.shape[-1]
    k = _param(top_k, x, torch.int64)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k).to(x.dtype)
    xs, lo, hi = _bracket(x)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) * 0.5
        many = (xs > mid).to(x.dtype).sum(dim=-1, keepdim=True) >= k
        lo = torch.where(many, mid, lo)
        hi = torch.where(many, hi, mid)
    return x.masked_fill(xs <= lo, float("-inf"))


def top_p_filter(x: torch.Tensor, top_p) -> torch.Tensor:
    """Nucleus filtering without a sort; p >= 1 keeps all.

    Keep token j iff the probability mass of tokens strictly more likely than j is <= p, i.e. its logit
    is >= the least t with mass(x > t) <= p. Bisection keeps mass(x > lo) > p >= mass(x > hi), and
    keeping x > lo keeps at least one token."""
    if not isinstance(top_p, torch.Tensor) and top_p >= 1.0:
        return x
    probs = torch.softmax(x, dim=-1)
    p = _param(top_p, x, probs.dtype)
    p = torch.where(p >= 1.0, torch.full_like(p, 2.0), p)  # disabled: every mass is <= 2
    xs, lo, hi = _bracket(x)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) * 0.5
        # probs * mask, not where(mask, probs, 0): the same sum bit for bit (probabilities are finite and >= 0),
        # and ONNX Runtime's CPU Where runs ~5x slower than Cast + Mul (40 steps, [16, 64, 1024]: 74 vs 14 ms)
        mass = (probs * (xs > mid).to(probs.dtype)).sum(dim=-1, keepdim=True)
        ok = mass <= p
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return x.masked_fill(xs <= lo, float("-inf"))


def gumbel_noise(keys: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise float32 [B, n, V]: -log(-log(u)) of ``uniform_noise``."""
    return -torch.log(-torch.log(uniform_noise(keys, tokens, vocab_size)))


def uniform_noise(keys: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) float32 [B, n, V] for token indices ``tokens`` [n] of the images keyed by ``keys`` int32
    [B, NOISE_KEYS]: the 6-round Feistel generator of ``restok.noise`` in int32, bit for bit its reference.

    Exported as ONNX Add/Mul/Mod on INT32. Every intermediate stays below 2^24 (exact even in float32): a
    round computes (L + (R + k)^2) mod P with L, R, k < P, at most P + 4P^2, the same as
    (L + ((R + k)^2 mod P)) mod P with one Mod instead of two (Mod is the slow op on a CPU). The first round works on [B, 1, V] and
    [B, n, 1] tensors; only the rounds after it touch every (token, vocabulary entry)."""
    P = NOISE_PRIME
    k = keys.to(torch.int32)
    col = lambda i: k[:, i].reshape(-1, 1, 1)  # noqa: E731
    v = torch.arange(vocab_size, dtype=torch.int32, device=k.device).reshape(1, 1, -1)
    t = tokens.to(torch.int32).reshape(1, -1, 1)
    hi = -(-vocab_size // P)
    left = t * hi + col(0)  # < 2P, reduced by the first round's Mod
    if hi > 1:
        left = left + v // P
    right = torch.remainder(v % P + col(1), P)
    for r in range(NOISE_ROUNDS):
        f = right + col(2 + r)
        left, right = right, torch.remainder(left + f * f, P)
    u = ((left * P + right).to(torch.float32) + 0.5) * (1.0 / (P * P))
    return torch.clamp_max(u, UNIFORM_MAX)  # float32 rounds the largest counters up to 1.0


def sample_tokens(
    logits: torch.Tensor,
    gumbel: torch.Tensor,
    *,
    cfg_scale=None,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
) -> torch.Tensor:
    """logits [2B or B, n, V] -> token ids int64 [B, n].

    ``cfg_scale`` None means no guidance (the batch is not doubled); otherwise the batch is [cond; uncond].
    ``gumbel`` [B, n, V] is Gumbel(0, 1) noise (``gumbel_noise``). Parameters may be Python numbers,
    one-element tensors or one value per image ([B]; graph inputs).
    """
    x = logits.float()
    if cfg_scale is not None:
        x = apply_cfg(x, cfg_scale)
    x = x / torch.clamp_min(_param(temperature, x, x.dtype), 1e-5)
    x = top_k_filter(x, top_k)
    x = top_p_filter(x, top_p)
    return torch.argmax(x + gumbel.to(x.dtype), dim=-1)
