"""The PyTorch reference generation loop: one pass per schedule step over a preallocated KV cache.

Other backends (ONNX Runtime, TensorRT) run the same schedule with the same sampling and the same noise;
this loop is what they are checked against.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from restok.models.generator import HARGenerator
from restok.noise import gumbel_noise
from restok.sampling import sample_tokens
from restok.schedule import CFG_SCHEDULES, HARSchedule, cfg_scale_at

MODES = ("har", "vanilla")


def _as_labels(gen: HARGenerator, labels, device) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(list(labels) if not isinstance(labels, int) else [labels])
    if labels.is_floating_point():
        raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long).reshape(-1)
    gen.check_labels(labels)
    return labels


def check_sampling_args(cfg_scale: float, cfg_schedule: str, temperature: float, top_k: int, top_p: float) -> None:
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg schedule {cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 disables), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 disables), got {top_p}")


@torch.no_grad()
def generate(
    gen: HARGenerator,
    labels: torch.Tensor | Sequence[int],
    *,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    cfg_start: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    noise: torch.Tensor | np.ndarray | None = None,
    mode: str = "har",
    return_step_logits: bool = False,
):
    """Generate token ids int64 [B, N] for class ``labels`` [B].

    Guidance is on when ``cfg_scale > 1``: the batch is doubled with the null class, and each step uses
    ``cfg_scale_at(cfg_schedule, cfg_scale, step.cfg_ratio, cfg_start)``. Sampling is Gumbel-max on
    ``noise`` [B, N, vocab] (Gumbel(0, 1)), drawn from ``seed`` when not given (a fresh seed when neither
    is). ``mode="vanilla"`` runs one token per pass. With ``return_step_logits`` the raw logits of every
    pass ([2B or B, n, vocab]) are returned too, for parity checks.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_sampling_args(cfg_scale, cfg_schedule, temperature, top_k, top_p)
    device = gen.tok_embeddings.weight.device
    labels = _as_labels(gen, labels, device)
    B, N, V = labels.shape[0], gen.cfg.block_size, gen.cfg.vocab_size
    if noise is None:
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31))
        noise = gumbel_noise(seed, B, N, V)
    if isinstance(noise, np.ndarray):
        noise = torch.from_numpy(noise)
    if tuple(noise.shape) != (B, N, V):
        raise ValueError(f"noise must have shape [batch, tokens, vocab] = {(B, N, V)}, got {tuple(noise.shape)}")
    noise = noise.to(device=device, dtype=torch.float32)

    schedule: HARSchedule = gen.schedule if mode == "har" else gen.vanilla_schedule()
    guided = cfg_scale > 1.0
    run_labels = torch.cat([labels, torch.full_like(labels, gen.cfg.null_class)]) if guided else labels
    caches = gen.new_kv_caches(run_labels.shape[0], schedule)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    step_logits = []
    was_training = gen.training
    gen.eval()
    try:
        prev = None
        for step in schedule.steps:
            tokens = None if prev is None else (torch.cat([prev, prev]) if guided else prev)
            logits = gen.forward_step(step, tokens, run_labels, caches, schedule)
            scale = cfg_scale_at(cfg_schedule, cfg_scale, step.cfg_ratio, cfg_start) if guided else None
            sl = slice(step.predicts[0], step.predicts[-1] + 1)
            prev = sample_tokens(logits, noise[:, sl], cfg_scale=scale, temperature=temperature, top_k=top_k, top_p=top_p)
            out[:, sl] = prev
            if return_step_logits:
                step_logits.append(logits)
    finally:
        gen.train(was_training)
    return (out, step_logits) if return_step_logits else out
