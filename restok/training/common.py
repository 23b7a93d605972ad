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
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from restok.configs import config_from_dict
from restok.fileutil import atomic_write_bytes, staged

# substrings of parameter names that get no weight decay (the official rule), besides every tensor with ndim < 2
NO_DECAY = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed", "rope", "freqs_cis")


# ------------------------------------------------------------------------------------- config


@dataclass
class TrainRunConfig:
    """What every trainer's config has: the run (output, model, optimizer, schedule, bookkeeping). Trainers
    subclass it, adding their own fields and redeclaring the defaults that differ."""

    data_field: ClassVar[str] = ""  # the field naming the training data; its content is compared as <field>_content

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
    trace_samples: bool = False  # each process appends the global positions it trained on (samples_rankN.jsonl)


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
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError:
            d[k] = v
    return config_from_dict(cls, d)


# ------------------------------------------------------------------------------------ resume
# A resumed run must compute what the checkpointed run would have: every setting is compared with the
# checkpoint's config.json, and the data's content with the fingerprint in trainer.pt, except the settings below,
# which do not change what is computed: where the run lives and runs (the batches and every per-sample choice
# are seeded per sample, whatever the process count, device placement or loader threads), how often it logs,
# saves and draws samples, how many checkpoints it keeps, where it stops early, and the tokenizer that only
# draws the generator's sample images. ``steps`` IS compared: the cosine schedule ends at it, so extending a run
# changes the learning rate of every step still to come (allow it with --resume-override steps).

RESUME_FREE = frozenset({"out", "device", "fsdp", "workers", "log_every", "save_every", "sample_every", "keep",
                         "stop_at", "trace_samples", "tokenizer"})
NOT_RECORDED = "not recorded (the checkpoint was written before restok recorded it)"


def content_setting(cls) -> str:
    """The name under which a trainer's data content is compared: data_content, codes_content."""
    return f"{cls.data_field}_content" if cls.data_field else ""


def resume_setting_names(cls) -> list[str]:
    """Every setting a resume compares (the names --resume-override takes)."""
    names = [f.name for f in fields(cls) if f.name not in RESUME_FREE]
    return names + ([content_setting(cls)] if cls.data_field else [])


def check_override_names(cls, names: Iterable[str]) -> None:
    """Refuse a name that is no compared setting: a typo must not silently allow nothing."""
    known = resume_setting_names(cls)
    for n in names:
        if n in RESUME_FREE:
            raise ValueError(f"{n!r} is never compared on resume (it does not change results), so it needs no override")
        if n not in known:
            raise ValueError(f"{n!r} is not a setting compared on resume; the compared ones are: {', '.join(known)}")


def _json_value(v):
    return json.loads(json.dumps(v))


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def recorded_settings(ckpt: Path, cls) -> dict:
    """The compared settings of the run that wrote ``ckpt`` (config.json); a field it lacks was added to restok
    later and had its default."""
    path = ckpt / "config.json"
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is missing or unreadable ({e}), so the run's settings cannot be checked; "
                         f"restore it, or remove {ckpt} to resume from the checkpoint before it") from e
    return {f.name: old.get(f.name, _json_value(_default(f))) for f in fields(cls) if f.name not in RESUME_FREE}


def check_resume(ckpt: Path, cfg, state: dict, fingerprints: dict[str, str], allowed: Iterable[str] = ()) -> list[str]:
    """Refuse to resume ``ckpt`` with settings or data that differ from the ones it was trained with, except the
    ``allowed`` ones; returns the allowed differences, described."""
    now = {k: _json_value(v) for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    was = recorded_settings(ckpt, type(cfg))
    was_fp = state.get("fingerprints", {})
    said = {k: f"{k} was {json.dumps(was[k])}, now {json.dumps(v)}" for k, v in now.items() if was[k] != v}
    said.update({k: f"{k} was {json.dumps(was_fp[k]) if k in was_fp else NOT_RECORDED}, now {json.dumps(v)}"
                 for k, v in fingerprints.items() if was_fp.get(k) != v})
    allowed = set(allowed)
    refused = [k for k in said if k not in allowed]
    if refused:
        raise ValueError(f"cannot resume from {ckpt}: the run's settings differ from the checkpoint's: "
                         f"{'; '.join(said[k] for k in refused)}; resume with the checkpoint's settings, or allow "
                         f"the change with --resume-override {' '.join(refused)}")
    return list(said.values())


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
# A training checkpoint is a folder written whole and swapped in (restok.fileutil.staged): each model and its
# EMA as restok checkpoints, config.json, and trainer.pt, which holds only tensors, numbers and strings (the
# optimizer states, RNG states, counters) and is read with torch.load(weights_only=True): no code runs from
# a checkpoint file.

TRAINER_STATE = "trainer.pt"


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
         "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(int(x) for x in mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_training_checkpoint(out: Path, step: int, models: dict, ema: dict, state: dict, config, keep: int = 2) -> Path:
    """out/checkpoints/step_N/: each model and its EMA as restok checkpoints, trainer.pt (optimizer,
    RNG, counters), config.json; written in a staging folder, then swapped in; ``latest`` updated last."""
    from restok.checkpoints import save_checkpoint

    root = out / "checkpoints"
    final = root / f"step_{step:07d}"
    with staged(final, owned=_checkpoint_files) as tmp:
        for name, m in models.items():
            save_checkpoint(unwrap(m), tmp / name)
        for name, e in ema.items():
            save_checkpoint(e.copy_to(_clone(models[name])), tmp / f"{name}_ema")
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
        (tmp / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    atomic_write_bytes(root / "latest", final.name.encode())
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_files(folder: Path) -> list[str]:
    """Everything in a training checkpoint folder is restok's (it is written whole, then swapped in)."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(unwrap(model)).cpu()


def checkpoints(out: Path) -> list[Path]:
    """The complete training checkpoints of a run, oldest first (a folder is complete once it is there:
    checkpoints are swapped in whole)."""
    root = Path(out) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / TRAINER_STATE).is_file()
             and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_trainer_state(ckpt: Path) -> dict:
    path = ckpt / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, damaged, or holding objects that are not plain data
        raise ValueError(f"{path} cannot be read as restok trainer state ({type(e).__name__}: {str(e)[:200]}); "
                         f"remove {ckpt} to resume from the checkpoint before it") from e


def restore(ckpt: Path, models: dict, optimizers: dict, ema: dict, device, state: dict | None = None,
            scaler=None) -> dict:
    """Load every model (and its EMA) of a training checkpoint, the optimizers named in the trainer state,
    the fp16 loss scale (``scaler``) and the RNG states; returns the trainer state (``state['step']`` is the
    last completed step). A checkpoint that does not fit (reachable only through --resume-override of the model or losses) is a clear error."""
    from restok.checkpoints import load_generator, load_tokenizer

    st = load_trainer_state(ckpt) if state is None else state
    try:
        for name, model in models.items():
            if name in ("tokenizer", "generator"):
                load = load_tokenizer if name == "tokenizer" else load_generator
                unwrap(model).load_state_dict(load(ckpt / name).state_dict())
                if name in ema:
                    e = ema[name]
                    saved = load(ckpt / f"{name}_ema").state_dict()
                    e.shadow = {k: v.to(device) for k, v in saved.items() if k in e.shadow}
                    e.updates = st["ema_updates"]
            else:  # auxiliary modules (the discriminator) live in the trainer state
                unwrap(model).load_state_dict(st[name])
    except (KeyError, RuntimeError) as e:  # missing module state, other shapes or parameter names
        raise _misfit(ckpt, e) from e
    try:
        for name, opt in optimizers.items():
            opt.load_state_dict(st[f"{name}_optimizer"])
    except (KeyError, ValueError) as e:  # missing optimizer state, other parameter groups
        raise _misfit(ckpt, e) from e
    if scaler is not None:  # fp16: the loss scale and its growth count go on where they were
        if "grad_scaler" not in st:
            raise ValueError(f"{ckpt} holds no fp16 loss scale (a checkpoint of an older restok); resume it with "
                             "the precision it was trained with, or start a new run")
        scaler.load_state_dict(st["grad_scaler"])
    set_rng_state(st["rng"])
    return st


def _misfit(ckpt: Path, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return ValueError(f"{ckpt} does not fit the model of this config ({type(e).__name__}: {first}); resume with "
                      "the checkpoint's model and loss settings")


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
    """JSONL metrics (rank 0) and a progress bar. A resumed run first drops the records after its
    checkpoint (the steps it is about to redo), so no step is logged twice."""

    def __init__(self, out: Path, total: int, start: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        if enabled and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) < start]
            atomic_write_bytes(self.path, "".join(line + "\n" for line in keep).encode())
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


# ---------------------------------------------------------------------------------- the loop

MODEL_KINDS = ("tokenizer", "generator")  # saved as restok checkpoints; other modules live in trainer.pt


def prepare_run(out: Path, d: Dist, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None to start at step 0. ``resume`` takes the newest complete
    checkpoint (whatever ``latest`` says); a new run refuses a folder that holds checkpoints unless
    ``overwrite``, which first removes that run's checkpoints and metrics (files restok wrote)."""
    found = checkpoints(out)
    if resume:
        if not found:
            say_once(d, f"no complete checkpoint in {out}/checkpoints: starting at step 0")
        return found[-1] if found else None
    if found and not overwrite:
        raise ValueError(f"{out} already holds a training run (checkpoints up to step {int(found[-1].name[5:])}); "
                         "continue it with --resume, start again with --overwrite, or choose another out=")
    if found and d.main:
        shutil.rmtree(out / "checkpoints")
        for f in [out / "metrics.jsonl", *out.glob("samples_rank*.jsonl")]:
            f.unlink(missing_ok=True)
    return None


def save_run(out: Path, step: int, models: dict, optimizers: dict, ema: dict, config,
             fingerprints: dict[str, str] | None = None, scaler=None) -> Path:
    state = {f"{k}_optimizer": o.state_dict() for k, o in optimizers.items()}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    state["fingerprints"] = dict(fingerprints or {})  # the data's identity, checked on resume
    state["ema_updates"] = next(iter(ema.values())).updates if ema else 0
    state.update({k: unwrap(m).state_dict() for k, m in models.items() if k not in MODEL_KINDS})
    primary = {k: m for k, m in models.items() if k in MODEL_KINDS}
    return save_training_checkpoint(out, step, primary, ema, state, config, config.keep)


def train_loop(cfg: TrainRunConfig, d: Dist, models: dict, optimizers: dict, ema: dict, step_fn, *, resume: bool,
               overwrite: bool, desc: str, sample_fn=None, fingerprints: dict[str, str] | None = None,
               resume_override: Iterable[str] = (), scaler=None) -> Path:
    """The skeleton both trainers share: run folder, resume, learning-rate schedule, EMA, logging, samples,
    checkpoints, early stop. ``step_fn(step, lr) -> (values to log, grad norm, global positions)`` does one
    optimisation step; ``optimizers['model']`` follows the schedule, the others keep their own rate.
    ``fingerprints`` (setting name -> data fingerprint) are recorded in each checkpoint; a resume refuses
    settings or fingerprints that differ from the checkpoint's, except those named in ``resume_override``.
    ``scaler`` (fp16's GradScaler) is saved and restored with the optimizers: a resume keeps the loss scale."""
    fingerprints = fingerprints or {}
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = prepare_run(out, d, resume, overwrite)
    if d.world > 1:
        dist.barrier()
    start = 0
    if ckpt is not None:
        st = load_trainer_state(ckpt)
        changed = check_resume(ckpt, cfg, st, fingerprints, resume_override)
        start = restore(ckpt, models, optimizers, ema, d.device, st, scaler)["step"] + 1
        say_once(d, f"resumed from {ckpt} at step {start}" + (f" (allowed: {'; '.join(changed)})" if changed else ""))
    log = MetricsLog(out, cfg.steps, start, d.main, desc)
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg.lr, cfg.end_lr, cfg.warmup_steps, cfg.steps)
        for g in optimizers["model"].param_groups:
            g["lr"] = lr
        values, gnorm, positions = step_fn(step, lr)
        for name, e in ema.items():
            e.update(unwrap(models[name]))
        if cfg.trace_samples:
            with open(out / f"samples_rank{d.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "rank": d.rank, "world": d.world,
                                    "positions": [int(p) for p in positions]}) + "\n")
        last = step == cfg.steps - 1 or step == cfg.stop_at
        if step % cfg.log_every == 0 or last:
            log.log(step, **{k: all_reduce_mean(v.detach().float(), d).item() for k, v in values.items()},
                    lr=lr, grad_norm=gnorm)
        if sample_fn is not None and d.main and cfg.sample_every > 0 and (step % cfg.sample_every == 0 or last):
            sample_fn(step)
        if d.main and ((step + 1) % cfg.save_every == 0 or last):
            save_run(out, step, models, optimizers, ema, cfg, fingerprints, scaler)
        log.advance()
        if step == cfg.stop_at:
            break
    log.close()
    return out


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
