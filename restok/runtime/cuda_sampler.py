"""The sampler of the CUDA backend: the exported graph's sampling (restok.sampling) in one kernel per pass.

Eager, a pass's sampling is ~30 kernels of noise, ~6 per top-k bisection step and ~7 per top-p step: with
40 steps each, the bisections are most of the kernels of an image. The fused sampler is one Triton program
per (image, position) row that does what ``restok.sampling.sample_tokens`` does on ``gumbel_noise``, in
the same order: guidance mix, temperature, top-k bisection, top-p bisection over the softmax, the 6-round
Feistel noise of ``restok.noise`` (exact int32), Gumbel-max. The eager functions are the reference
(``EagerSampler``); the fused one differs only where float rounding of exp/log/sum in another order moves a
kept-set boundary or an argmax tie, which the tests measure. A batch that needs no top-k (or no top-p) runs
a kernel without that filter: which filters run is part of the captured graph's key.

Triton runs on NVIDIA GPUs; with ``TRITON_INTERPRET=1`` the same kernel runs on the CPU (slowly), which is
how CI checks it against the eager sampler. No torch or triton at import: both are imported on first use.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from restok.noise import NOISE_KEYS, NOISE_PRIME, NOISE_ROUNDS, UNIFORM_MAX

SAMPLERS = ("auto", "eager", "fused")


def triton_available(device_type: str) -> bool:
    """Triton can run the fused sampler here: on a CUDA device, or anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class EagerSampler:
    """The reference: ``restok.sampling`` as the exported graph runs it, skipping the filters no image needs."""

    name = "eager"

    def __call__(self, logits, keys, positions, cfg, temperature, top_k, top_p, need_top_k: bool, need_top_p: bool):
        from restok.sampling import gumbel_noise, sample_tokens

        noise = gumbel_noise(keys, positions, logits.shape[-1])
        return sample_tokens(logits, noise, cfg_scale=cfg, temperature=temperature,
                             top_k=top_k if need_top_k else 0, top_p=top_p if need_top_p else 1.0)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sample_rows(logits_ptr, keys_ptr, positions_ptr, cfg_ptr, temp_ptr, topk_ptr, topp_ptr, out_ptr,
                    batch, new, inv_pp, u_max,
                    V: tl.constexpr, BLOCK: tl.constexpr, GUIDED: tl.constexpr, TOPK: tl.constexpr,
                    TOPP: tl.constexpr, STEPS: tl.constexpr, P: tl.constexpr, ROUNDS: tl.constexpr,
                    NKEYS: tl.constexpr, HI: tl.constexpr):
        row = tl.program_id(0)  # image b, new position j
        b = row // new
        j = row % new
        offs = tl.arange(0, BLOCK)
        valid = offs < V
        neg = float("-inf")
        x = tl.load(logits_ptr + (b * new + j) * V + offs, mask=valid, other=neg)
        if GUIDED:  # apply_cfg: u + (c - u) * s, the conditional logits where s == 1
            u = tl.load(logits_ptr + ((batch + b) * new + j) * V + offs, mask=valid, other=neg)
            s = tl.load(cfg_ptr + b)
            x = tl.where(s == 1.0, x, u + (x - u) * s)
            x = tl.where(valid, x, neg)
        x = x / tl.maximum(tl.load(temp_ptr + b), 1e-5)
        if TOPK:  # top_k_filter
            k = tl.load(topk_ptr + b)
            k = tl.where((k <= 0) | (k > V), V, k).to(tl.float32)
            xs = x - tl.max(x, 0)
            lo = tl.min(tl.where((xs == neg) | (xs == float("inf")), 0.0, xs), 0) - 1.0
            hi = lo * 0.0
            for _ in range(STEPS):
                mid = (lo + hi) * 0.5
                many = tl.sum((xs > mid).to(tl.float32), 0) >= k
                lo = tl.where(many, mid, lo)
                hi = tl.where(many, hi, mid)
            x = tl.where(xs <= lo, neg, x)
        if TOPP:  # top_p_filter
            mx = tl.max(x, 0)
            e = tl.exp(x - mx)
            probs = e / tl.sum(e, 0)
            p = tl.load(topp_ptr + b)
            p = tl.where(p >= 1.0, 2.0, p)
            xs = x - mx
            lo = tl.min(tl.where((xs == neg) | (xs == float("inf")), 0.0, xs), 0) - 1.0
            hi = lo * 0.0
            for _ in range(STEPS):
                mid = (lo + hi) * 0.5
                ok = tl.sum(probs * (xs > mid).to(tl.float32), 0) <= p
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid)
            x = tl.where(xs <= lo, neg, x)
        # uniform_noise: the 6-round Feistel permutation of (token, vocabulary entry), exact in int32
        t = tl.load(positions_ptr + j).to(tl.int32)
        kb = keys_ptr + b * NKEYS
        v = offs.to(tl.int32)
        left = t * HI + tl.load(kb)
        if HI > 1:
            left = left + v // P
        right = (v % P + tl.load(kb + 1)) % P
        for r in tl.static_range(ROUNDS):
            f = right + tl.load(kb + 2 + r)
            nxt = (left + f * f) % P
            left = right
            right = nxt
        un = ((left * P + right).to(tl.float32) + 0.5) * inv_pp
        un = tl.minimum(un, u_max)
        y = tl.where(valid, x + (-tl.log(-tl.log(un))), neg)
        tok = tl.argmax(y, 0).to(tl.int64)
        tl.store(out_ptr + b * new + j, tok)
        if GUIDED:
            tl.store(out_ptr + (batch + b) * new + j, tok)

    return triton, sample_rows


class FusedSampler:
    """One Triton program per (image, position) row; writes the tokens of the conditional rows and, with
    guidance, repeats them for the unconditional rows (the graph's ``next_tokens`` layout)."""

    name = "fused"

    def __call__(self, logits, keys, positions, cfg, temperature, top_k, top_p, need_top_k: bool, need_top_p: bool,
                 out=None):
        import torch

        from restok.sampling import BISECTION_STEPS

        triton, kernel = _kernel()
        rows, new, V = logits.shape
        batch = keys.shape[0]
        guided = cfg is not None
        if rows != (2 * batch if guided else batch):
            raise ValueError(f"logits have {rows} rows for {batch} images (guided: {guided})")
        result = out if out is not None else torch.empty((rows, new), dtype=torch.int64, device=logits.device)
        kernel[(batch * new,)](
            logits.contiguous(), keys.contiguous(), positions.contiguous(),
            cfg if guided else temperature, temperature, top_k, top_p, result,
            batch, new, float(np.float32(1.0 / (NOISE_PRIME * NOISE_PRIME))), UNIFORM_MAX,
            V=V, BLOCK=triton.next_power_of_2(V), GUIDED=guided, TOPK=need_top_k, TOPP=need_top_p,
            STEPS=BISECTION_STEPS, P=NOISE_PRIME, ROUNDS=NOISE_ROUNDS, NKEYS=NOISE_KEYS,
            HI=-(-V // NOISE_PRIME), num_warps=8 if V >= 4096 else 4)
        return result[:batch]


def make_sampler(kind: str, device_type: str):
    """``auto``: fused where Triton runs (a CUDA device), else eager; ``eager`` or ``fused`` as asked."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")
    if kind == "auto":
        kind = "fused" if device_type == "cuda" and triton_available(device_type) else "eager"
    if kind == "fused" and not triton_available(device_type):
        raise ImportError("the fused sampler needs Triton (pip install triton) on a CUDA device, or "
                          "TRITON_INTERPRET=1 to run it on the CPU")
    return FusedSampler() if kind == "fused" else EagerSampler()
