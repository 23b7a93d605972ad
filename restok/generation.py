"""The PyTorch reference generation loop: one pass per schedule step over a preallocated KV cache.

Other backends (ONNX Runtime, TensorRT) run the same schedule with the same sampling and the same noise;
this loop is what they are checked against.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from restok.models.generator import HARGenerator
from restok.noise import NOISE_KEYS, noise_keys
from restok.sampling import gumbel_noise, sample_tokens
from restok.sampling_params import SamplingParams, check_seed
from restok.schedule import HARSchedule

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
    noise_start: int = 0,
    keys: torch.Tensor | np.ndarray | None = None,
    mode: str = "har",
    return_step_logits: bool = False,
):
    """Generate token ids int64 [B, N] for class ``labels`` [B].

    Guidance is on when ``cfg_scale > 1``: the batch is doubled with the null class, and each step uses
    ``cfg_scale_at(cfg_schedule, cfg_scale, step.cfg_ratio, cfg_start)``. Sampling is Gumbel-max on the
    noise of ``restok.noise``, keyed per image by ``keys`` int32 [B, NOISE_KEYS], drawn from ``seed`` when
    not given (image k uses stream ``noise_start + k``, as in the runtime, so both draw the same tokens; a
    fresh seed when neither is given). ``mode="vanilla"`` runs one token per pass. With
    ``return_step_logits`` the raw logits of every pass ([2B or B, n, vocab]) are returned too.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = SamplingParams(cfg_scale, cfg_schedule, cfg_start, temperature, top_k, top_p).validate()
    device = gen.tok_embeddings.weight.device
    labels = _as_labels(gen, labels, device)
    B, N = labels.shape[0], gen.cfg.block_size
    if keys is None:
        seed = int(np.random.default_rng().integers(2**31)) if seed is None else check_seed(seed)
        keys = noise_keys(seed, B, start=check_seed(noise_start, "noise_start"))
    if isinstance(keys, np.ndarray):
        keys = torch.from_numpy(keys)
    if tuple(keys.shape) != (B, NOISE_KEYS):
        raise ValueError(f"noise keys must have shape [batch, {NOISE_KEYS}] = {(B, NOISE_KEYS)}, got {tuple(keys.shape)}")
    keys = keys.to(device=device, dtype=torch.int32)

    schedule: HARSchedule = gen.schedule if mode == "har" else gen.vanilla_schedule()
    guided = params.guided
    scales = params.cfg_scales(schedule)
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
            sl = step.predicted
            noise = gumbel_noise(keys, torch.as_tensor(step.position_ids, device=device), gen.cfg.vocab_size)
            prev = sample_tokens(logits, noise, cfg_scale=scales[step.index] if guided else None,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
            out[:, sl] = prev
            if return_step_logits:
                step_logits.append(logits)
    finally:
        gen.train(was_training)
    return (out, step_logits) if return_step_logits else out
