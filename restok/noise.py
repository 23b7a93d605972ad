"""Sampling noise shared by every backend (numpy only, so the runtime can draw it without torch).

restok samples with Gumbel-max: ``argmax(filtered_logits / T + g)`` with ``g ~ Gumbel(0, 1)`` is an exact
sample from the filtered softmax. The noise is an explicit input, drawn here from a seed with numpy's
PCG64, so PyTorch, ONNX Runtime and TensorRT draw the same tokens from the same seed. Image ``i`` of a run
has its own stream (seeded by ``[seed, i]``), so results do not depend on how the run is batched.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gumbel_noise"]


def gumbel_noise(seed: int, batch: int, num_tokens: int, vocab_size: int, start: int = 0) -> np.ndarray:
    """float32 [batch, num_tokens, vocab_size] of Gumbel(0, 1) samples for images start..start+batch-1."""
    out = np.empty((batch, num_tokens, vocab_size), dtype=np.float32)
    for b in range(batch):
        u = np.random.default_rng([int(seed), start + b]).random((num_tokens, vocab_size), dtype=np.float32)
        # u in [0, 1): u == 0 gives -inf (never chosen); the largest u gives about +16.6.
        with np.errstate(divide="ignore"):
            out[b] = -np.log(-np.log(u))
    return out
