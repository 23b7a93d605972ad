"""Named architectures: ``L`` (ResTok-L/128 + GPT-L HAR, the official shapes), ``B`` (ResTok-L/128 +
GPT-B) and ``tiny`` (a few MB, the same 128-token 9-step schedule; for tests, the demo and the bundled
model), plus seeded random weights that make numerical checks meaningful."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.tokenizer import ResTok, TokenizerConfig
from restok.sampling_params import check_seed


@dataclass(frozen=True)
class Preset:
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


_TINY_TOKENIZER = dict(
    image_size=32, codebook_size=1024, enc_width=64, enc_layers=4, enc_heads=2, dec_width=64, dec_layers=4,
    dec_heads=2, cnn_hidden=32, cnn_channel_mult=(1, 2, 2),
)

PRESETS: dict[str, Preset] = {
    "L": Preset(TokenizerConfig(), GeneratorConfig()),
    "B": Preset(TokenizerConfig(), GeneratorConfig(dim=768, n_layer=12, n_head=12)),
    "tiny": Preset(
        TokenizerConfig(**_TINY_TOKENIZER),
        GeneratorConfig(dim=128, n_layer=4, n_head=4, vocab_size=1024, num_classes=10),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def randomize_weights_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights with nothing trivial in them, in place.

    The official initialisation zeroes the generator's output head (every logit 0) and sets norms to 1,
    biases to 0 and layer scales to 1, which makes parity checks vacuous. Here matrices get N(0, 1/fan_in),
    embeddings N(0, 1), norm weights 1 + N(0, 0.2^2), biases N(0, 0.2^2) and layer scales U(0.5, 1.5).
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if "gamma" in name:
                v = 0.5 + torch.rand(shape, generator=g)
            elif p.ndim >= 2 and ("level_embedding" in name or "mask_token" in name):
                v = 0.5 * torch.randn(shape, generator=g)
            elif p.ndim >= 2 and ("embedding" in name or "embeddings" in name):
                v = torch.randn(shape, generator=g)
            elif p.ndim >= 2:
                v = torch.randn(shape, generator=g) / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(shape, generator=g)
            else:
                v = 0.2 * torch.randn(shape, generator=g)
            p.copy_(v.to(p.dtype))
    return model


def _build(cls, config_cls: type, config, part: str, seed: int | None) -> nn.Module:
    cfg = getattr(get_preset(config), part) if isinstance(config, str) else config
    if not isinstance(cfg, config_cls):
        raise TypeError(f"config must be a preset name ({', '.join(PRESETS)}) or a {config_cls.__name__}, "
                        f"got {type(config).__name__}")
    if seed is not None:
        check_seed(seed)
    model = cls(cfg)
    if seed is not None:
        randomize_weights_(model, seed)
    return model.eval()


def build_tokenizer(config: str | TokenizerConfig = "L", seed: int | None = None) -> ResTok:
    """A tokenizer of a preset or config; with ``seed``, seeded random weights (else the official init)."""
    return _build(ResTok, TokenizerConfig, config, "tokenizer", seed)


def build_generator(config: str | GeneratorConfig = "L", seed: int | None = None) -> HARGenerator:
    """A generator of a preset or config; with ``seed``, seeded random weights (else the official init)."""
    return _build(HARGenerator, GeneratorConfig, config, "generator", seed)
