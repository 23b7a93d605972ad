"""What both trainers share: process setup (single or torchrun), the optimizer with the official
no-decay rule, warm-up + cosine, EMA, exact-resume checkpoints, metrics and progress."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from restok.fileutil import atomic_write_bytes, staged

# substrings of parameter names that get no weight decay (the official rule), besides every tensor with ndim < 2
NO_DECAY = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed", "rope", "freqs_cis")


# ------------------------------------------------------------------------------------- config


@dataclass
class TrainRunConfig:
    """What every trainer's config has: the run (output, model, optimizer, schedule, bookkeeping). Trainers
    subclass it, adding their own fields and redeclaring the defaults that differ."""

    out: str = "runs/train"
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # model config fields overriding the preset
    init_from: str = ""  # a checkpoint to start from
    steps: int = 1000
    batch_size: int = 32  # global, over all processes
    lr: float = 1e-4
    end_lr: float = 1e-5
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "auto"  # auto (bf16 on GPUs, fp32 on CPUs) | fp32 | bf16 | fp16
    device: str = "auto"
    seed: int = 10086
    workers: int = 0
    log_every: int = 10
    save_every: int = 1000
    sample_every: int = 1000
    keep: int = 2
    stop_at: int = -1  # stop (with a checkpoint) after this step, e.g. for time-boxed jobs; resume later
    fsdp: bool = False


def load_config(cls, path: str | os.PathLike | None, overrides: list[str]):
    """A dataclass from a JSON file plus ``key=value`` overrides (values parsed as JSON when they can be)."""
    d = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
    known = {f.name for f in fields(cls)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError:
            d[k] = v
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**d)


# ------------------------------------------------------------------------------------ process


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_process(device: str = "auto") -> Dist:
    """Single process, or torchrun (RANK/WORLD_SIZE set): gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def teardown_process() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, fsdp: bool = False) -> nn.Module:
    """DDP across processes (FSDP on GPUs for large presets); the model itself when alone."""
    if d.world == 1:
        return model
    if fsdp:
        if d.device.type != "cuda":
            raise ValueError("FSDP needs GPUs (gloo has no reduce-scatter); use DDP on CPUs")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, device_id=d.device, use_orig_params=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(s in name for s in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, base: float, end: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine from ``base`` to ``end`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of the parameters; decay min((1+t)/(10+t), decay), first update copies."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        t = self.updates
        d = 0.0 if t == 0 else min((1 + t) / (10 + t), self.decay)
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> nn.Module:
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(sd[k].dtype) if k in self.shadow else sd[k] for k in sd})
        return model


# ---------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_training_checkpoint(out: Path, step: int, models: dict, ema: dict, state: dict, config, keep: int = 2) -> Path:
    """out/checkpoints/step_N/: each model and its EMA as restok checkpoints, trainer.pt (optimizer,
    RNG, counters), config.json; written in a staging folder, then renamed; ``latest`` updated last."""
    from restok.checkpoints import save_checkpoint

    root = out / "checkpoints"
    final = root / f"step_{step:07d}"
    with staged(final, owned=_checkpoint_files) as tmp:
        for name, m in models.items():
            save_checkpoint(unwrap(m), tmp / name)
        for name, e in ema.items():
            save_checkpoint(e.copy_to(_clone(models[name])), tmp / f"{name}_ema")
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    atomic_write_bytes(root / "latest", final.name.encode())
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_files(folder: Path) -> list[str]:
    """Everything in a training checkpoint folder is restok's (it is written whole, then swapped in)."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(unwrap(model)).cpu()


def latest_checkpoint(out: Path) -> Path | None:
    p = out / "checkpoints" / "latest"
    if not p.is_file():
        return None
    d = out / "checkpoints" / p.read_text().strip()
    return d if d.is_dir() else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)


def resume(ckpt: Path, name: str, model: nn.Module, opt, ema: "EMA | None", device) -> dict:
    """Restore ``model`` (checkpoint folder ``name``), its optimizer, EMA and the RNG states from a training
    checkpoint; returns the trainer state (``state['step']`` is the last completed step)."""
    from restok.checkpoints import load_generator, load_tokenizer

    load = load_tokenizer if name == "tokenizer" else load_generator
    model.load_state_dict(load(ckpt / name).state_dict())
    st = load_trainer_state(ckpt)
    opt.load_state_dict(st["optimizer"])
    if ema is not None:
        ema.shadow = {k: v.to(device) for k, v in load(ckpt / f"{name}_ema").state_dict().items() if k in ema.shadow}
        ema.updates = st["ema_updates"]
    set_rng_state(st["rng"])
    return st


def autocast_for(precision: str, device: torch.device):
    """(context factory, grad scaler or None): 'auto' is bf16 on GPUs and fp32 on CPUs."""
    import contextlib

    p = "bf16" if precision == "auto" and device.type == "cuda" else ("fp32" if precision == "auto" else precision)
    if p == "fp32":
        return contextlib.nullcontext, None
    if p not in ("bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if p == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def optimizer_step(loss: torch.Tensor, opt, params, clip: float, scaler=None) -> float:
    """Backward, gradient clipping (after unscaling), step; returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return float(gnorm)


# ------------------------------------------------------------------------------------ logging


class MetricsLog:
    """JSONL metrics (rank 0) and a progress bar."""

    def __init__(self, out: Path, total: int, start: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr, disable=None if enabled else True)
        self.t0 = time.perf_counter()

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.perf_counter() - self.t0, 3),
               **{k: (round(float(v), 6) if isinstance(v, (float, int, np.floating)) else v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if isinstance(v, float)}, refresh=False)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def say_once(d: Dist, msg: str) -> None:
    if d.main:
        print(f"restok train: {msg}", file=sys.stderr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= d.world
    return x
