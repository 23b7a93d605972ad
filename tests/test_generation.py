"""restok.generate, the PyTorch API: reproducible per seed and invariant to batching, guidance changes the
tokens, bad input is refused."""

import numpy as np
import pytest
import torch

import restok
from restok import SamplingParams
from restok.noise import noise_keys


def test_same_seed_same_tokens_and_batching_invariance(tiny_generator):
    gen = tiny_generator
    a = restok.generate(gen, [1, 2, 3], seed=11)
    b = restok.generate(gen, [1, 2, 3], seed=11)
    c = restok.generate(gen, [1, 2, 3], seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (3, 128)
    # image 2 alone, with the stream of image 2 of the run, gives the same tokens
    solo = restok.generate(gen, [3], seed=11, noise_start=2)
    assert torch.equal(solo[0], a[2])
    explicit = restok.generate(gen, [3], keys=noise_keys(11, 1, start=2))
    assert torch.equal(explicit[0], a[2])


def test_guidance_changes_tokens(tiny_generator):
    gen = tiny_generator
    a = restok.generate(gen, [4], SamplingParams(cfg_scale=1.0), seed=1)
    b = restok.generate(gen, [4], SamplingParams(cfg_scale=4.0), seed=1)
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=[10]), r"class labels must lie in \[0, 10\)"),
        (dict(labels=[-1]), "class labels"),
        (dict(labels=[1], cfg_schedule="sigmoid"), "cfg_schedule must be one of"),
        (dict(labels=[1], top_p=1.5), "top_p"),
        (dict(labels=[1], top_k=-2), "top_k"),
        (dict(labels=[1], mode="fast"), "mode"),
        (dict(labels=[1], keys=np.zeros((1, 5), np.int32)), r"noise keys must be integers in \[0, 2039\) of shape \[1, 8\]"),
        (dict(labels=[1], temperature=float("nan")), "temperature must be a finite number"),
        (dict(labels=[1], cfg_scale=float("inf")), "cfg_scale must be a finite number"),
        (dict(labels=[1], seed=-1), "seed must be an integer"),
        (dict(labels=torch.tensor([1.0])), "integers"),
    ],
)
def test_bad_generate_input(tiny_generator, kwargs, match):
    labels = kwargs.pop("labels")
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in {s.name for s in SamplingParams.settings()}}
    with pytest.raises(ValueError, match=match):
        restok.generate(tiny_generator, labels, SamplingParams(**settings), **kwargs)


def test_pytorch_api_and_runtime_share_their_defaults(bundled_artifacts):
    """The same call with no settings given draws the same tokens from restok.generate and Pipeline.generate:
    both default to SamplingParams() (the paper's settings) and seed 0, declared once."""
    import inspect
    from pathlib import Path

    from restok.runtime import Pipeline

    gen = restok.load_generator(Path(restok.__file__).parent / "assets" / "tiny" / "generator")
    labels = [3, 1, 4, 1, 5, 9]
    ids = restok.generate(gen, labels)
    with Pipeline(bundled_artifacts) as p:
        got = p.generate(labels, decode=False).tokens
    assert np.array_equal(got, ids.numpy()), f"{(got != ids.numpy()).mean():.4f} of the tokens differ"
    for fn in (restok.generate, Pipeline.generate):
        params = inspect.signature(fn).parameters
        assert params["sampling"].default == SamplingParams(), fn
        assert (params["seed"].default, params["noise_start"].default, params["keys"].default) == (0, 0, None), fn
