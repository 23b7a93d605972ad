"""The PyTorch reference generation loop: one pass per schedule step over a preallocated KV cache.

Other backends (ONNX Runtime, TensorRT) run the same schedule with the same sampling and the same noise;
this loop is what they are checked against.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from restok.models.generator import HARGenerator
from restok.noise import check_keys, noise_keys
from restok.sampling import gumbel_noise, sample_tokens
from restok.sampling_params import SamplingParams, batch_settings, check_seed, per_image
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
    if labels.numel() == 0:
        raise ValueError("labels must name at least one class")
    gen.check_labels(labels)
    return labels


@torch.no_grad()
def generate(
    gen: HARGenerator,
    labels: torch.Tensor | Sequence[int],
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    seed: int = 0,
    noise_start: int = 0,
    keys: torch.Tensor | np.ndarray | None = None,
    mode: str = "har",
    return_step_logits: bool = False,
):
    """Generate token ids int64 [B, N] for class ``labels`` [B]: the same arguments and defaults as the
    runtime's ``Pipeline.generate``, and the same tokens.

    ``sampling`` is one ``SamplingParams`` for every image or one per image. Guidance is on for an image
    when its ``cfg_scale > 1``: the batch is doubled with the null class, and each pass uses the scale of
    its schedule (``SamplingParams.cfg_scales``). Sampling is Gumbel-max on the noise of ``restok.noise``:
    image k uses stream ``noise_start + k`` of ``seed`` (or row k of ``keys`` int32 [B, NOISE_KEYS]).
    ``mode="vanilla"`` runs one token per pass. With ``return_step_logits`` the raw logits of every pass
    ([2B or B, n, vocab]) are returned too.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = gen.tok_embeddings.weight.device
    labels = _as_labels(gen, labels, device)
    B, N = labels.shape[0], gen.cfg.block_size
    params = per_image(sampling, B)
    check_seed(seed)
    if keys is None:
        keys = noise_keys(seed, B, start=check_seed(noise_start, "noise_start"))
    keys = torch.from_numpy(check_keys(keys, B)).to(device)

    schedule: HARSchedule = gen.schedule if mode == "har" else gen.vanilla_schedule()
    guided = any(p.guided for p in params)
    settings = _settings(params, schedule, device)
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
            noise = gumbel_noise(keys, torch.as_tensor(step.position_ids, device=device), gen.cfg.vocab_size)
            prev = sample_tokens(logits, noise, cfg_scale=settings["cfg_scale"][step.index] if guided else None,
                                 temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"])
            out[:, step.predicted] = prev
            if return_step_logits:
                step_logits.append(logits)
    finally:
        gen.train(was_training)
    return (out, step_logits) if return_step_logits else out


def _settings(params: list[SamplingParams], schedule: HARSchedule, device) -> dict:
    """The per-image settings as the sampler takes them: Python numbers when every image shares one
    SamplingParams (the sampler then skips a disabled top-k/top-p), else one value per image ([B])."""
    if all(p == params[0] for p in params):
        p = params[0]
        return {"cfg_scale": p.cfg_scales(schedule), "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}
    arrays = batch_settings(params, schedule)
    out = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    out["cfg_scale"] = list(out["cfg_scale"])  # one [B] tensor per pass
    return out
