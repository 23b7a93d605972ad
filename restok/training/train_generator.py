"""Train (or fine-tune) a HAR generator on token ids from ``restok extract-codes``: teacher forcing over the
layout of ``restok.schedule`` (or vanilla AR), cross-entropy over all positions, class dropout to the null
class, token/residual dropout; EMA; exact resume; single process or torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from restok.training import common as C
from restok.training.data import Batcher, CodesDataset, data_fingerprint, sample_rng


@dataclass
class GeneratorTrainConfig(C.TrainRunConfig):
    data_field = "codes"  # its content is compared on resume as codes_content
    out: str = "runs/generator"
    codes: str = "runs/codes"  # restok extract-codes output
    tokenizer: str = ""  # optional: a tokenizer checkpoint, to save generated samples as images
    vanilla: bool = False  # plain AR over every latent token instead of HAR
    class_dropout: float = -1.0  # probability of the null class per sample; -1 = the model's class_dropout_prob
    steps: int = 3000
    batch_size: int = 64


def build_generator_for_training(cfg: GeneratorTrainConfig, vocab: int, num_classes: int):
    from restok.checkpoints import load_generator
    from restok.models.generator import GeneratorConfig, HARGenerator
    from restok.models.presets import get_preset

    if cfg.init_from:
        return load_generator(cfg.init_from, cfg.preset)
    d = {**get_preset(cfg.preset).generator.to_dict(), **cfg.model}
    d.setdefault("vocab_size", vocab)
    if d["vocab_size"] != vocab or d["num_classes"] != num_classes:
        raise ValueError(f"the codes have vocab {vocab} and {num_classes} classes; the generator config has "
                         f"vocab {d['vocab_size']} and {d['num_classes']} classes (set model.vocab_size / model.num_classes)")
    return HARGenerator(GeneratorConfig(**d))


def train_generator(cfg: GeneratorTrainConfig, resume: bool = False, overwrite: bool = False,
                    resume_override: Iterable[str] = ()) -> Path:
    """Run the training; returns the output folder (checkpoints/, metrics.jsonl, samples/). A resume refuses
    settings or data that differ from the checkpoint's, except those named in ``resume_override``."""
    resume_override = tuple(resume_override)
    C.check_override_names(type(cfg), resume_override)
    d = C.setup_process(cfg.device)
    try:
        C.seed_everything(cfg.seed)
        data = CodesDataset(cfg.codes)
        gen = build_generator_for_training(cfg, int(data.meta["vocab_size"]), data.num_classes).to(d.device)
        schedule = gen.vanilla_schedule() if cfg.vanilla else gen.schedule
        p_drop = gen.cfg.class_dropout_prob if cfg.class_dropout < 0 else cfg.class_dropout
        gen.cls_embedding.dropout_prob_in_forward = False  # the trainer drops classes per sample, reproducibly
        batcher = Batcher(data, cfg.batch_size, cfg.seed, d.rank, d.world, cfg.workers)
        C.say_once(d, f"generator {sum(p.numel() for p in gen.parameters()):,} parameters, {len(data)} coded images, "
                      f"{'vanilla' if cfg.vanilla else 'HAR'} ({schedule.num_steps} passes), {d.world} process(es) on {d.device}")
        if p_drop <= 0:
            C.say_once(d, "class dropout: off (no classifier-free guidance will be learned)")
        if cfg.ema_decay <= 0:
            C.say_once(d, "EMA: off")
        model = C.wrap_model(gen, d, cfg.fsdp)
        opt = torch.optim.AdamW(C.param_groups(gen, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        ema = {"generator": C.EMA(gen, cfg.ema_decay)} if cfg.ema_decay > 0 else {}
        autocast, scaler = C.autocast_for(cfg.precision, d.device)
        tok = None
        if cfg.tokenizer and d.main and cfg.sample_every > 0:
            from restok.checkpoints import load_tokenizer

            tok = load_tokenizer(cfg.tokenizer).to(d.device)
        null = gen.cfg.null_class
        gen.train()

        def step_fn(step: int, lr: float):
            x, y, pos = batcher.batch(step)
            ids = torch.from_numpy(x).to(d.device)
            labels = torch.from_numpy(y).to(d.device)
            drop = torch.tensor([sample_rng(cfg.seed, step, int(p), 2).random() < p_drop for p in pos], device=d.device)
            labels = torch.where(drop, torch.full_like(labels, null), labels)
            with autocast():
                logits = model(ids, labels, schedule)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1))
            gnorm = C.optimizer_step(loss, opt, gen.parameters(), cfg.grad_clip, scaler)
            return {"loss": loss}, gnorm, pos

        def sample_fn(step: int) -> None:
            if tok is not None:
                _save_samples(Path(cfg.out), step, gen, ema.get("generator"), tok, data.num_classes)

        return C.train_loop(cfg, d, {"generator": gen}, {"model": opt}, ema, step_fn, resume=resume,
                            overwrite=overwrite, desc="train generator", sample_fn=sample_fn,
                            resume_override=resume_override, scaler=scaler,
                            fingerprints={C.content_setting(type(cfg)): data_fingerprint(data)})
    finally:
        C.teardown_process()


@torch.no_grad()
def _save_samples(out: Path, step: int, gen, ema, tok, num_classes: int) -> None:
    import copy

    from restok.generation import generate
    from restok.images import make_grid, save_png, to_uint8

    g = copy.deepcopy(gen).eval()
    if ema is not None:
        ema.copy_to(g)
    labels = list(range(min(num_classes, 10)))
    ids = generate(g, labels, cfg_scale=3.0, cfg_schedule="constant", top_p=0.95, seed=step)
    imgs = tok.decode(ids.to(next(tok.parameters()).device))
    save_png(make_grid(to_uint8(imgs.float().cpu().numpy())), out / "samples" / f"generated_{step:07d}.png")
