"""PyTorch models: the ResTok tokenizer and the HAR generator (checkpoint-compatible with the official code)."""

from restok.models.generator import GeneratorConfig, HARGenerator
from restok.models.presets import PRESETS, Preset, build_generator, build_tokenizer, get_preset, randomize_weights_
from restok.models.tokenizer import ResTok, TokenizerConfig

__all__ = [
    "GeneratorConfig",
    "HARGenerator",
    "PRESETS",
    "Preset",
    "ResTok",
    "TokenizerConfig",
    "build_generator",
    "build_tokenizer",
    "get_preset",
    "randomize_weights_",
]
