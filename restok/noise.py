"""Sampling randomness: a counter-based generator inside the generator graph, keyed per image (no torch here).

restok samples with Gumbel-max (``argmax(filtered_logits / T + g)``, g ~ Gumbel(0, 1), an exact sample of
the filtered softmax). The Gumbel noise for token t and vocabulary entry v of an image is computed inside
the graph from (t, v) and the image's ``NOISE_KEYS`` keys: the host supplies 8 int32 keys (32 bytes) per
image, drawn here with numpy's PCG64 from ``[seed, image index]``, so the same seed gives the same image on
every backend and whatever the batching.

Why this design (measured, see tests/test_noise.py and the closing notes of the GPU-ready runtime issue):
- the previous host-side Gumbel tensor costs 128 x vocabulary float32 per image (4 MiB and ~6-13 ms of
  numpy time at vocabulary 8192): more host work and PCIe traffic than a GPU needs for the whole image;
- inverse-CDF sampling with one uniform per token (512 bytes per image) was built and measured: its
  draw moves when the cumulative sum of all lower-index probabilities moves, so small numerical
  differences flip tokens far more often than Gumbel-max (fp16 vs fp32 on the tiny preset: 29% of tokens
  agreed, against 99.9% with Gumbel-max), which would make precision gates and parity meaningless;
- so the noise is generated where it is used, by exact integer arithmetic that TensorRT's ONNX parser
  builds from 10.3 on (Add, Mul, Mod on INT32; the onnx-tensorrt operator matrices of 10.1-GA, 10.6,
  10.15 and 11.1 list all three with INT32) and that ONNX Runtime and PyTorch compute identically;
- every intermediate value stays below 2^24, so the arithmetic is exact even where a runtime evaluates
  int32 operations in float32: OpenVINO's CPU plugin does (measured: with a prime near 2^15, whose squares
  reach 2^31, none of its values matched; with P = 2039 its integers are exact and the final floats within
  one ulp), and nothing promises that a GPU kernel will not.

The generator is a 6-round Feistel permutation of Z_P x Z_P (P = 2039, prime; P + (2P)^2 < 2^24) over the
counter (t, v), with the round function F(x) = (x + k_r)^2 mod P: distinct (t, v) never share a value
(4.2M states, at least 128 tokens x 2039 x ceil(V / 2039) counters), and 6 rounds pass uniformity and
serial-correlation tests along the vocabulary, token and image axes (tests/test_noise.py). Floating point comes last: the counter's conversion to u in (0, 1) uses correctly
rounded IEEE operations (int to float, add, multiply, min: the same bits on every backend), then
g = -log(-log(u)), whose last-bit differences between backends matter as little as those of the logits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NOISE_KEYS", "NOISE_PRIME", "NOISE_ROUNDS", "check_keys", "noise_keys", "noise_uniforms"]

NOISE_PRIME = 2039
NOISE_ROUNDS = 6
NOISE_KEYS = NOISE_ROUNDS + 2  # two whitening keys, then one per round
UNIFORM_MAX = float(np.float32(1.0) - np.float32(2.0**-24))  # the largest float32 below 1


def noise_keys(seed: int, count: int, start: int = 0) -> np.ndarray:
    """int32 [count, NOISE_KEYS]: the keys of images start..start+count-1 of run ``seed``."""
    out = np.empty((count, NOISE_KEYS), dtype=np.int32)
    for b in range(count):
        out[b] = np.random.default_rng([int(seed), int(start) + b]).integers(0, NOISE_PRIME, NOISE_KEYS)
    return out


def check_keys(keys, count: int) -> np.ndarray:
    """Caller-given noise keys as int32 [count, NOISE_KEYS], each in [0, NOISE_PRIME), or a ValueError that says
    what they must be (a torch tensor is taken through its numpy view)."""
    if hasattr(keys, "detach") and hasattr(keys, "cpu"):  # a torch tensor, without importing torch
        keys = keys.detach().cpu().numpy()
    arr = np.asarray(keys) if isinstance(keys, (np.ndarray, list, tuple)) else None
    if arr is None or arr.shape != (count, NOISE_KEYS) or not np.issubdtype(arr.dtype, np.integer) \
            or arr.min() < 0 or arr.max() >= NOISE_PRIME:
        got = type(keys).__name__ if arr is None else arr.shape
        raise ValueError(f"noise keys must be integers in [0, {NOISE_PRIME}) of shape [{count}, {NOISE_KEYS}], got {got}")
    return arr.astype(np.int32)


def check_capacity(num_tokens: int, vocab_size: int) -> None:
    """The counter (t, v) must fit the permutation's domain: tokens x ceil(V / P) < P."""
    if num_tokens * -(-vocab_size // NOISE_PRIME) >= NOISE_PRIME:
        raise ValueError(f"{num_tokens} tokens x vocabulary {vocab_size} exceed the noise generator's domain")


def noise_uniforms(keys: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """float32 [B, n, V] of U(0, 1): the reference (numpy int64, written independently of the torch code) of
    what the graph computes before the logs, bit for bit."""
    P = NOISE_PRIME
    check_capacity(int(np.max(tokens)) + 1, vocab_size)
    k = np.asarray(keys, dtype=np.int64)
    B = k.shape[0]
    t = np.asarray(tokens, dtype=np.int64)[None, :, None]
    v = np.arange(vocab_size, dtype=np.int64)[None, None, :]
    hi = -(-vocab_size // P)
    L = (t * hi + v // P + k[:, 0].reshape(B, 1, 1)) % P
    R = (v % P + k[:, 1].reshape(B, 1, 1)) % P
    L, R = np.broadcast_to(L, (B, t.shape[1], vocab_size)), np.broadcast_to(R, (B, t.shape[1], vocab_size))
    for r in range(NOISE_ROUNDS):
        f = (R + k[:, 2 + r].reshape(B, 1, 1)) ** 2 % P
        L, R = R, (L + f) % P
    u = ((L * P + R).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (P * P))
    return np.minimum(u, np.float32(UNIFORM_MAX))
