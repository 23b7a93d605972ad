"""Numerical equality with the official ResTok code (github Kwai-Kolors/ResTok, commit e0059cb).

How the golden tensors in tests/golden/ were made (the official code is not part of restok; only these
tensors are): the official repository was run on the CPU (torch 2.13.0) in a separate environment, with
torchvision stubbed for timm. Small configs so the files stay small:
- tokenizer: the official ``ResTok`` built from the official infer config with ViT width 64, 4 layers,
  4 heads (a local copy of the code with an extra "tiny" entry in its size tables), codebook 1024, and its
  hard-coded CNN config changed to 32 hidden channels with channel_mult [1, 2] (so 32x32 images give the
  same 16x16 token grid); crop_size stays 256 (it only sets the grid). Every parameter was then replaced by
  seeded random values (matrices N(0, 1/fan_in), embedding tables N(0, 1), norms 1 + N(0, 0.04), biases N(0, 0.04), layer scales
  U(0.5, 1.5), level embeddings and mask tokens N(0, 0.25)), so no part is trivial. Saved: that state
  dict, two random images, ``encode`` ids, ``decode_tokens`` images with 128 and with 16 kept tokens.
- generator: the official HAR ``Transformer`` with ModelArgs(dim 64, 2 layers, 4 heads, vocab 512,
  10 classes, block 128, ar_token_num 4, spe_token_num 127), randomised the same way (so the output head
  is not zero). Saved: teacher-forced logits on random ids; ``generate_har`` with cfg 3.75, schedule
  "step", window start 0.25, min cfg 1.0, num_steps 9, top_k 1 (greedy): its tokens and the logits of
  each of its 9 cached forward passes (captured with a forward hook); and the same weights in the
  official model with ar_token_num 128 (plain 128-step AR, num_steps 128): its tokens and logits.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import restok
from restok import SamplingParams
from restok.models import GeneratorConfig, HARGenerator, ResTok, TokenizerConfig

GOLDEN = Path(__file__).parent / "golden"


def _sd(g):
    return {k[3:]: v for k, v in g.items() if k.startswith("sd.")}


@pytest.fixture(scope="module")
def tok_golden():
    g = load_file(GOLDEN / "official_tokenizer_small.safetensors")
    cfg = TokenizerConfig(image_size=32, codebook_size=1024, enc_width=64, enc_layers=4, enc_heads=4,
                          dec_width=64, dec_layers=4, dec_heads=4, cnn_hidden=32, cnn_channel_mult=(1, 2))
    tok = ResTok(cfg).eval()
    tok.load_state_dict(_sd(g), strict=True)
    return tok, g


@pytest.fixture(scope="module")
def gen_golden():
    g = load_file(GOLDEN / "official_generator_small.safetensors")
    gen = HARGenerator(GeneratorConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10)).eval()
    gen.load_state_dict(_sd(g), strict=True)
    return gen, g


def test_encode_ids_identical(tok_golden):
    tok, g = tok_golden
    assert g["decoded_128"].std() > 0.1  # not a vacuous decoder
    assert torch.equal(tok.encode(g["images"]), g["ids"])


@pytest.mark.parametrize("n", [128, 16])
def test_decode_matches(tok_golden, n):
    tok, g = tok_golden
    out = tok.decode(g["ids"], n if n != 128 else None)
    assert (out - g[f"decoded_{n}"]).abs().max().item() <= 1e-4


def test_teacher_forced_logits(gen_golden):
    gen, g = gen_golden
    assert g["tf_logits"].std() > 0.1  # the output head is not zero
    with torch.no_grad():
        logits = gen(g["tf_ids"], g["tf_labels"])
    assert logits.dtype == torch.float32 and logits.shape == g["tf_logits"].shape
    assert (logits - g["tf_logits"]).abs().max().item() <= 1e-4


def test_cached_steps_and_greedy_tokens(gen_golden):
    gen, g = gen_golden
    ids, steps = restok.generate(gen, g["labels"], SamplingParams(**OFFICIAL_SAMPLING), seed=0,
                                 return_step_logits=True)
    assert len(steps) == 9
    for i, s in enumerate(steps):
        ref = g[f"har_step{i}_logits"]
        assert s.shape == ref.shape
        assert (s - ref).abs().max().item() <= 1e-4, f"step {i}"
    assert torch.equal(ids, g["har_tokens"])


def test_vanilla_mode(gen_golden):
    gen, g = gen_golden
    ids, steps = restok.generate(gen, g["labels"], SamplingParams(**OFFICIAL_SAMPLING), seed=0,
                                 mode="vanilla", return_step_logits=True)
    assert len(steps) == 128
    assert (torch.cat(steps, dim=1) - g["vanilla_logits"]).abs().max().item() <= 1e-4
    assert torch.equal(ids, g["vanilla_tokens"])


# ------------------------------------------------------------------ through the whole chain
# The official small models exported to ONNX and run by the torch-free runtime on ONNX Runtime: the
# runtime is tied to the official code, not only to restok's own modules.

OFFICIAL_SAMPLING = dict(cfg_scale=3.75, cfg_schedule="step", cfg_start=0.25, top_k=1, top_p=1.0)


@pytest.mark.parametrize("which", ["golden_generator_artifacts", "golden_generator_artifacts_inplace"])
def test_runtime_equals_official_generation(request, which):
    from restok.runtime import Pipeline, SamplingParams

    g = load_file(GOLDEN / "official_generator_small.safetensors")
    art = request.getfixturevalue(which)
    out = Pipeline(art).generate(g["labels"].numpy(), SamplingParams(**OFFICIAL_SAMPLING), keep_logits=True,
                                 decode=False)
    assert len(out.step_logits) == 9
    for i, logits in enumerate(out.step_logits):
        ref = g[f"har_step{i}_logits"].numpy()
        assert logits.shape == ref.shape, i
        assert abs(logits - ref).max() <= 1e-3, f"pass {i}: {abs(logits - ref).max()}"
    assert (out.tokens == g["har_tokens"].numpy()).all()


def test_runtime_tokenizer_equals_official(golden_tokenizer_artifacts):
    from restok.runtime import Pipeline

    t = load_file(GOLDEN / "official_tokenizer_small.safetensors")
    p = Pipeline(golden_tokenizer_artifacts)
    assert (p.encode(t["images"].numpy()) == t["ids"].numpy()).all()
    assert abs(p.decode(t["ids"].numpy()) - t["decoded_128"].numpy()).max() <= 1e-4
