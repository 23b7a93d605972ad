"""Tokenizer: shapes, nested-dropout decoding, official constants, bad input."""

import pytest
import torch

from restok.models import TokenizerConfig
from restok.models.presets import get_preset


def test_encode_decode_shapes(tiny_tokenizer):
    tok = tiny_tokenizer
    s = tok.cfg.image_size
    images = torch.rand(2, 3, s, s)
    ids = tok.encode(images)
    assert ids.dtype == torch.int64 and ids.shape == (2, 128)
    assert 0 <= ids.min() and ids.max() < tok.cfg.codebook_size
    out = tok.decode(ids)
    assert out.shape == (2, 3, s, s) and out.dtype == torch.float32
    assert out.std() > 0.05
    # keeping fewer tokens changes the image; keeping all equals the default
    assert not torch.allclose(tok.decode(ids, 16), out)
    assert torch.equal(tok.decode(ids, 128), out)


def test_official_constants():
    L = get_preset("L").tokenizer
    assert L.merge_layers == [5, 11, 17] and L.grid_size == 16
    from restok.models import ResTok

    tok = ResTok(TokenizerConfig(**{**get_preset("tiny").tokenizer.to_dict(), "drop_prob": 0.2}))
    assert tok.nested_dropout_options == [4, 8, 16, 32, 64, 128]
    assert tok.nested_dropout_probs == pytest.approx([w / 155 for w in (1, 2, 4, 8, 16, 124)])


def test_parameter_count_of_L_matches_official():
    """ResTok-L/128 with the infer config has 659,693,771 parameters (spec A.11); built on the meta device."""
    from restok.models import ResTok

    with torch.device("meta"):
        tok = ResTok(get_preset("L").tokenizer)
    assert sum(p.numel() for p in tok.parameters()) == 659_693_771
    with torch.device("meta"):
        from restok.models import HARGenerator

        gen = HARGenerator(get_preset("L").generator)
    assert sum(p.numel() for p in gen.parameters()) == 326_263_808


def test_bad_input(tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        tok.encode(torch.rand(1, 3, 256, 256))
    with pytest.raises(ValueError, match="floating point"):
        tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1024\)"):
        tok.decode(torch.full((1, 128), 5000))
    with pytest.raises(ValueError, match=r"\[B, 128\]"):
        tok.decode(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="num_tokens"):
        tok.decode(torch.zeros(1, 128, dtype=torch.long), 0)


def test_config_validation():
    with pytest.raises(ValueError, match="head_dim"):
        TokenizerConfig(enc_width=96, enc_heads=16)
    with pytest.raises(ValueError, match="CNN stride"):
        TokenizerConfig(image_size=200)
    with pytest.raises(ValueError, match="unknown tokenizer config keys: bogus"):
        TokenizerConfig.from_dict({"bogus": 1})
