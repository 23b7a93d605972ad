"""The HAR schedule: the single source of truth for every shape and loop in restok.

A hierarchical autoregressive (HAR) generator produces ``num_latent_tokens`` tokens in a few forward
passes. The first ``ar_tokens`` tokens come one per pass (plain AR); after that each pass predicts a whole
level of the tokenizer's nested token hierarchy (blocks 1, 1, 2, 4, ..., N/2), feeding the previous level's
tokens followed by learned *special* tokens as placeholders for the positions being predicted.

Everything else is derived from this module: the teacher-forcing sequence layout, the attention mask, the
RoPE positions, the per-step graph shapes, the KV-cache lengths, the engines' optimization profiles and the
runtime loop. Vanilla AR is the same object with ``ar_tokens == num_latent_tokens``.

Pure Python + numpy: the runtime imports this without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "HARSchedule",
    "HARStep",
    "CFG_SCHEDULES",
    "EMBED_CLASS",
    "EMBED_TOKEN",
    "cfg_scale_at",
    "level_blocks",
    "pooling_grid",
]


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def level_blocks(num_latent_tokens: int) -> list[int]:
    """Sizes of the nested latent-token levels, e.g. 128 -> [1, 1, 2, 4, 8, 16, 32, 64].

    The tokenizer's nested dropout keeps prefixes of length 1, 2, 4, ..., N; the blocks are the first
    prefix followed by the successive differences. Shared by the tokenizer (per-level embeddings, pooling,
    per-level projections) and the generator (hierarchy of the AR groups).
    """
    if not _is_pow2(num_latent_tokens) or num_latent_tokens < 2:
        raise ValueError(
            f"num_latent_tokens must be a power of two >= 2 (the nested levels halve down to 1), "
            f"got {num_latent_tokens}"
        )
    prefixes = [num_latent_tokens]
    while prefixes[-1] // 2 > 1:
        prefixes.append(prefixes[-1] // 2)
    prefixes.append(1)
    prefixes.reverse()
    return [prefixes[0]] + [b - a for a, b in zip(prefixes, prefixes[1:])]


def pooling_grid(block_size: int) -> tuple[int, int]:
    """(h, w) of the 2D pooling target that initialises a latent level of ``block_size`` tokens.

    Doubling goes to the width first, then alternates: 1->(1,1), 2->(1,2), 4->(2,2), 8->(2,4), ...
    """
    if not _is_pow2(block_size):
        raise ValueError(f"latent block size must be a power of two, got {block_size}")
    k = int(math.log2(block_size))
    return 2 ** (k // 2), 2 ** (k - k // 2)


EMBED_CLASS, EMBED_TOKEN = -2, -1  # HARStep.embed_sources codes (>= 0: a special-token row)


@dataclass(frozen=True)
class HARStep:
    """One forward pass of the generator.

    ``positions`` are the sequence positions computed in this pass (contiguous, starting at ``cached``:
    every earlier position is already in the KV cache). The pass embeds, in this order, the class token
    (``class_input``), the generated tokens ``token_inputs`` and the special tokens ``special_inputs``; it
    predicts the tokens ``predicts`` (one per position, in order). ``cfg_ratio`` is the progress value the
    official CFG schedules are evaluated at.
    """

    index: int
    cached: int
    num_new: int
    class_input: bool
    token_inputs: tuple[int, ...]
    special_inputs: tuple[int, ...]
    predicts: tuple[int, ...]
    cfg_ratio: float

    @property
    def positions(self) -> range:
        return range(self.cached, self.cached + self.num_new)

    @property
    def total(self) -> int:
        """Sequence length after this pass (cached + new): the present KV length."""
        return self.cached + self.num_new

    @property
    def kind(self) -> str:
        if self.class_input:
            return "prefill"
        return "ar" if self.num_new == 1 else "har"

    @property
    def predicted(self) -> slice:
        """The token columns this pass predicts (a contiguous run of the image's tokens)."""
        return slice(self.predicts[0], self.predicts[-1] + 1)

    @property
    def embed_sources(self) -> np.ndarray:
        """int64 [num_new]: what each new position embeds, the generator graph's ``embed_sources`` input.

        ``EMBED_CLASS``: the class label in column p of the graph's ``tokens`` input; ``EMBED_TOKEN``: the
        image token in column p (the previous pass's predictions come first); j >= 0: special-token row j."""
        out = [EMBED_CLASS] * int(self.class_input) + [EMBED_TOKEN] * len(self.token_inputs)
        return np.asarray(out + list(self.special_inputs), dtype=np.int64)

    @property
    def position_ids(self) -> np.ndarray:
        """int64 [num_new]: the sequence (RoPE) positions computed in this pass, the graph's ``positions``."""
        return np.arange(self.cached, self.total, dtype=np.int64)


@dataclass(frozen=True)
class HARSchedule:
    """The schedule of a HAR (or vanilla AR) generator over ``num_latent_tokens`` tokens."""

    num_latent_tokens: int = 128
    ar_tokens: int = 4
    cls_tokens: int = 1

    def __post_init__(self) -> None:
        n, a = self.num_latent_tokens, self.ar_tokens
        level_blocks(n)  # validates n
        if self.cls_tokens != 1:
            raise ValueError(
                f"cls_tokens={self.cls_tokens}: only class-conditional generation with one condition token "
                "is supported (the official c2i setting)"
            )
        if not (_is_pow2(a) and 2 <= a <= n):
            raise ValueError(
                f"ar_tokens must be a power of two in [2, {n}], got {a} (the levels after the AR prefix must "
                "double; the official inference loop is inconsistent with its training layout for ar_tokens=1)"
            )

    # ------------------------------------------------------------------ steps
    @property
    def is_vanilla(self) -> bool:
        return self.ar_tokens == self.num_latent_tokens

    @property
    def num_steps(self) -> int:
        """ar_tokens + log2(N) - log2(ar_tokens): 9 for the official HAR, N for vanilla AR."""
        return self.ar_tokens + int(math.log2(self.num_latent_tokens // self.ar_tokens))

    @property
    def seq_len(self) -> int:
        """Sequence length of the teacher-forcing layout, and the KV-cache length needed by inference."""
        return self.cls_tokens + self.num_latent_tokens - 1

    @property
    def num_special_tokens_used(self) -> int:
        """How many special-token rows the layout reads (63 for the official HAR; the model has 127)."""
        return max((j for s in self.steps for j in s.special_inputs), default=-1) + 1

    @cached_property
    def steps(self) -> tuple[HARStep, ...]:
        a, n = self.ar_tokens, self.num_latent_tokens
        last = self.num_steps - 1
        steps = [HARStep(0, 0, 1, True, (), (), (0,), 0.0)]
        for k in range(1, a):  # plain AR: one token per pass
            steps.append(HARStep(k, k, 1, False, (k - 1,), (), (k,), k / last))
        start = a
        while start < n:  # one level per pass: tokens [start, 2*start)
            if start == a:  # the last AR token, then a-1 specials
                toks = (a - 1,)
                specials = tuple(range(0, a - 1))
            else:  # the previous level's tokens, then as many specials
                toks = tuple(range(start // 2, start))
                specials = tuple(range(start // 2 - 1, start - 1))
            k = len(steps)
            steps.append(HARStep(k, start, start, False, toks, specials, tuple(range(start, 2 * start)), k / last))
            start *= 2
        return tuple(steps)

    @property
    def cache_lengths(self) -> list[int]:
        """Positions already cached before each step (0,1,2,3,4,8,16,32,64 for the official HAR)."""
        return [s.cached for s in self.steps]

    @property
    def new_positions(self) -> list[int]:
        """New positions per step (1,1,1,1,4,8,16,32,64 for the official HAR)."""
        return [s.num_new for s in self.steps]

    # ---------------------------------------------------------------- layout
    @cached_property
    def layout(self) -> tuple[tuple[str, int], ...]:
        """The teacher-forcing sequence: ('class', 0) | ('token', i) | ('special', j) per position."""
        out: list[tuple[str, int]] = []
        for s in self.steps:
            if s.class_input:
                out.append(("class", 0))
            out.extend(("token", i) for i in s.token_inputs)
            out.extend(("special", j) for j in s.special_inputs)
        assert len(out) == self.seq_len
        return tuple(out)

    @cached_property
    def step_of_position(self) -> np.ndarray:
        """int64 [seq_len]: the step that computes each position."""
        out = np.empty(self.seq_len, dtype=np.int64)
        for s in self.steps:
            out[s.cached : s.total] = s.index
        return out

    @cached_property
    def attention_mask(self) -> np.ndarray:
        """bool [seq_len, seq_len]; True where query position i may attend key position j.

        A position sees every position of its own pass (bidirectionally) and of all earlier passes. This
        equals the official hierarchical mask (level(i) >= level(j), with the first ar_tokens rows made
        strictly causal); tests check that equality independently. So in cached inference a pass attends to
        every position already present (keys < ``step.total``): the exported generator needs no mask rows.
        """
        s = self.step_of_position
        return s[:, None] >= s[None, :]

    def to_dict(self) -> dict:
        """A JSON-ready description (written into manifests)."""
        return {
            "num_latent_tokens": self.num_latent_tokens,
            "ar_tokens": self.ar_tokens,
            "cls_tokens": self.cls_tokens,
            "num_steps": self.num_steps,
            "seq_len": self.seq_len,
            "steps": [
                {
                    "index": s.index,
                    "kind": s.kind,
                    "cached": s.cached,
                    "num_new": s.num_new,
                    "token_inputs": list(s.token_inputs),
                    "special_inputs": list(s.special_inputs),
                    "predicts": [s.predicts[0], s.predicts[-1] + 1],
                    "cfg_ratio": s.cfg_ratio,
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HARSchedule":
        return cls(int(d["num_latent_tokens"]), int(d["ar_tokens"]), int(d.get("cls_tokens", 1)))

    def vanilla(self) -> "HARSchedule":
        """The vanilla (one token per pass) schedule over the same tokens."""
        return HARSchedule(self.num_latent_tokens, self.num_latent_tokens, self.cls_tokens)


# ---------------------------------------------------------------------- CFG
CFG_SCHEDULES = ("constant", "linear", "linear_re", "step", "cosine", "cosine_re")


def cfg_scale_at(schedule: str, cfg_scale: float, ratio: float, start: float = 0.0, min_scale: float = 1.0) -> float:
    """Guidance scale at progress ``ratio`` (HARStep.cfg_ratio), following the official schedules.

    Quirks kept for equality with the official sampler: 'linear'/'linear_re' add 1e-4; 'step' returns
    ``min_scale`` before ``start`` (1.0 is returned as 1.0001) and ``cfg_scale`` from it on. The official
    'cosine'/'cosine_re' raise NameError (a missing import); here they compute the intended formula.
    """
    s = float(cfg_scale)
    if schedule == "constant":
        return s
    if schedule == "linear":
        return 1.0 + (s - 1.0) * ratio + 1e-4
    if schedule == "linear_re":
        return 1.0 + (s - 1.0) * (1.0 - ratio) + 1e-4
    if schedule == "step":
        if s == 1.0:
            return s
        if ratio >= start:
            return s
        return min_scale if min_scale != 1.0 else min_scale + 1e-4
    if schedule == "cosine":
        return 1.0 + (s - 1.0) * (0.5 * (1 - math.cos(math.pi * ratio)))
    if schedule == "cosine_re":
        return 1.0 + (s - 1.0) * (0.5 * (1 + math.cos(math.pi * ratio)))
    raise ValueError(f"unknown cfg schedule {schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
