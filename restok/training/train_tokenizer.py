"""Train (or fine-tune) a ResTok tokenizer: reconstruction + quantizer losses with nested dropout, and
optionally perceptual, GAN and frozen-encoder alignment losses; EMA; exact resume; single process or
torchrun."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from restok.training import common as C
from restok.training.data import Batcher, data_fingerprint, open_dataset, sample_rng


@dataclass
class TokenizerTrainConfig(C.TrainRunConfig):
    data_field = "data"  # its content is compared on resume as data_content
    out: str = "runs/tokenizer"
    data: str = "digits"  # digits | folder:PATH | wds:PATTERN
    weight_decay: float = 1e-4
    grad_clip: float = 10.0
    nested_dropout: bool = True
    perceptual_model: str = ""  # TorchScript file computing a per-image distance d(x, y); empty = off
    perceptual_weight: float = 1.0
    gan_start: int = -1  # step from which the discriminator trains; -1 = off
    gan_weight: float = 0.5
    disc_lr: float = 1e-4
    vf_model: str = ""  # frozen encoder to align to: timm:<name> or a TorchScript file; empty = off
    vf_feature_dim: int = 0  # its feature width (adds vf_proj / vf_proj_dec to the tokenizer)
    vf_weight: float = 1.0
    vf_margin: float = 0.25
    save_every: int = 500
    sample_every: int = 500


class _Recon(nn.Module):
    """The part of a step that needs gradient synchronisation: images -> (recon, encoder dict, dec feats)."""

    def __init__(self, tok, with_features: bool):
        super().__init__()
        self.tok, self.with_features = tok, with_features

    def forward(self, images, num_tokens):
        enc = self.tok.encode_codes(images)
        if self.with_features:
            feats, dec_feats = self.tok.decoder(enc["codes"], num_tokens, with_features=True)
        else:
            feats, dec_feats = self.tok.decoder(enc["codes"], num_tokens), None
        return self.tok.pixel_decoder(feats.float()), enc, dec_feats


def build_tokenizer_for_training(cfg: TokenizerTrainConfig):
    from restok.checkpoints import load_tokenizer
    from restok.models.presets import get_preset
    from restok.models.tokenizer import ResTok, TokenizerConfig

    if cfg.init_from:
        tok = load_tokenizer(cfg.init_from, cfg.preset)
        if cfg.vf_feature_dim and not tok.cfg.vf_feature_dim:
            tok2 = ResTok(TokenizerConfig(**{**tok.cfg.to_dict(), "vf_feature_dim": cfg.vf_feature_dim}))
            tok2.load_state_dict(tok.state_dict(), strict=False)
            tok = tok2
        return tok
    d = {**get_preset(cfg.preset).tokenizer.to_dict(), **cfg.model}
    if cfg.vf_feature_dim:
        d["vf_feature_dim"] = cfg.vf_feature_dim
    return ResTok(TokenizerConfig(**d))


def train_tokenizer(cfg: TokenizerTrainConfig, resume: bool = False, overwrite: bool = False,
                    resume_override: Iterable[str] = ()) -> Path:
    """Run the training; returns the output folder (checkpoints/, metrics.jsonl, samples/). A resume refuses
    settings or data that differ from the checkpoint's, except those named in ``resume_override``."""
    resume_override = tuple(resume_override)
    C.check_override_names(type(cfg), resume_override)
    d = C.setup_process(cfg.device)
    try:
        C.seed_everything(cfg.seed)
        tok = build_tokenizer_for_training(cfg).to(d.device)
        data = open_dataset(cfg.data, tok.cfg.image_size, train=True)
        batcher = Batcher(data, cfg.batch_size, cfg.seed, d.rank, d.world, cfg.workers)

        from restok.training.losses import load_frozen

        perceptual = load_frozen(cfg.perceptual_model, d.device) if cfg.perceptual_model else None
        vf = load_frozen(cfg.vf_model, d.device) if cfg.vf_model else None
        if vf is not None and not tok.cfg.vf_feature_dim:
            raise ValueError("vf_model needs vf_feature_dim (the frozen model's feature width)")
        C.say_once(d, f"tokenizer {sum(p.numel() for p in tok.parameters()):,} parameters, data {cfg.data} "
                      f"({len(data)} images), {d.world} process(es) on {d.device}")
        for name, on in (("nested dropout", cfg.nested_dropout), ("perceptual loss", perceptual is not None),
                         ("GAN discriminator", cfg.gan_start >= 0), ("feature alignment", vf is not None),
                         ("EMA", cfg.ema_decay > 0)):
            if not on:
                C.say_once(d, f"{name}: off")

        model = C.wrap_model(_Recon(tok, vf is not None).to(d.device), d, cfg.fsdp)
        opt = torch.optim.AdamW(C.param_groups(tok, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        models, optimizers = {"tokenizer": tok}, {"model": opt}
        disc = disc_opt = None
        if cfg.gan_start >= 0:
            from restok.training.losses import PatchDiscriminator, hinge_d_loss

            disc_core = PatchDiscriminator().to(d.device)
            disc = C.wrap_model(disc_core, d)
            disc_opt = torch.optim.AdamW(C.param_groups(disc_core, cfg.weight_decay), lr=cfg.disc_lr,
                                         betas=(cfg.beta1, cfg.beta2))
            models["disc"], optimizers["disc"] = disc_core, disc_opt
        ema = {"tokenizer": C.EMA(tok, cfg.ema_decay)} if cfg.ema_decay > 0 else {}
        autocast, scaler = C.autocast_for(cfg.precision, d.device)
        options = np.asarray(tok.nested_dropout_options)
        probs = np.asarray(tok.nested_dropout_probs)
        tok.train()
        last = {}

        def step_fn(step: int, lr: float):
            x, _, pos = batcher.batch(step)
            images = torch.from_numpy(x).to(d.device)
            n_keep = None
            if cfg.nested_dropout:
                n_keep = torch.tensor([int(sample_rng(cfg.seed, step, int(p), 1).choice(options, p=probs)) for p in pos],
                                      device=d.device)
            with autocast():
                recon, enc, dec_feats = model(images, n_keep)
            recon = recon.float()
            parts = {"mse": F.mse_loss(recon, images), "quantizer": enc["quantizer_loss"]}
            if perceptual is not None:
                parts["perceptual"] = cfg.perceptual_weight * perceptual(recon, images).mean()
            if vf is not None:
                from restok.training.losses import vf_alignment_loss

                vf_l, _ = vf_alignment_loss(tok, enc, dec_feats, images, vf, cfg.vf_margin)
                parts["vf"] = cfg.vf_weight * vf_l
            gan_on = disc is not None and step >= cfg.gan_start
            if gan_on:
                parts["gan"] = cfg.gan_weight * -disc(recon).mean()
            loss = sum(parts.values())
            gnorm = C.optimizer_step(loss, opt, tok.parameters(), cfg.grad_clip, scaler)
            if gan_on:
                disc_opt.zero_grad(set_to_none=True)
                d_loss = hinge_d_loss(disc(images), disc(recon.detach()))
                d_loss.backward()
                disc_opt.step()
                parts["disc"] = d_loss.detach()
            last.update(images=images, recon=recon)
            return {"loss": loss, **parts}, gnorm, pos

        def sample_fn(step: int) -> None:
            _save_samples(Path(cfg.out), step, last["images"], last["recon"])

        return C.train_loop(cfg, d, models, optimizers, ema, step_fn, resume=resume, overwrite=overwrite,
                            desc="train tokenizer", sample_fn=sample_fn, resume_override=resume_override,
                            scaler=scaler,
                            fingerprints={C.content_setting(type(cfg)): data_fingerprint(data)})
    finally:
        C.teardown_process()


def _save_samples(out: Path, step: int, images: torch.Tensor, recon: torch.Tensor, n: int = 8) -> None:
    from restok.images import make_grid, save_png, to_uint8

    k = min(n, images.shape[0])
    both = torch.cat([images[:k], recon[:k].detach()]).float().cpu().numpy()
    save_png(make_grid(to_uint8(both), columns=k), out / "samples" / f"recon_{step:07d}.png")
