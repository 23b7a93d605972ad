"""The Python API under random arguments: every call either does what it says (the right number and shape
of results) or raises TypeError/ValueError (ArtifactError for the export's limits) with a message; never
another exception, never a half-made result, and the pipeline works afterwards."""

import random

import numpy as np
import pytest

from restok.manifest import ArtifactError
from restok.noise import NOISE_KEYS
from restok.runtime import Pipeline
from restok.sampling_params import SamplingParams

ACCEPTED = (TypeError, ValueError, ArtifactError)


def _value(rng: random.Random):
    return rng.choice([None, True, 0, 1, 3, -1, 9, 10, 2**31, 2**63, 1.5, 2.0, float("nan"), float("inf"), -0.0,
                       "2", "", "step", "linear", b"1", [], [1], [1, 2], [[1]], [1.5], ["3"], {}, {"cfg_scale": 2},
                       (3,), np.int64(4), np.float32(0.5), np.array([1, 2], np.int32), np.array([], np.int64),
                       np.array([[1, 2]]), object()])


def _check_message(e: Exception) -> None:
    assert isinstance(e, ACCEPTED), f"{type(e).__name__}: {e}"
    assert str(e).strip() and len(str(e)) < 2000


def test_sampling_params_take_good_values_or_say_which_is_wrong():
    rng = random.Random(7)
    names = [s.name for s in SamplingParams.settings()]
    made = 0
    for _ in range(400):
        kwargs = {n: _value(rng) for n in rng.sample(names, rng.randrange(1, 4))}
        if rng.random() < 0.1:
            kwargs["colour"] = 1
        try:
            p = SamplingParams(**kwargs)
        except Exception as e:  # noqa: BLE001 - the kind of exception is what is tested
            _check_message(e)
            assert any(n in str(e) for n in kwargs) or "colour" in str(e), (kwargs, e)
            continue
        made += 1
        for s in SamplingParams.settings():  # what was kept is what the setting's check says
            v = getattr(p, s.name)
            assert v == s.check(v) and type(v) is s.kind, (kwargs, s.name, v)
    assert made >= 20


def test_generate_returns_what_it_says_or_raises_a_clear_error(tiny_artifacts):
    rng = random.Random(11)
    ok_calls = 0
    with Pipeline(tiny_artifacts, threads=1) as pipe:
        n_classes = pipe.manifest.num_classes
        want_tokens = pipe.manifest.num_tokens
        for _ in range(150):
            labels = rng.choice([_value(rng), [rng.randrange(n_classes) for _ in range(rng.randrange(1, 7))]])
            kwargs = {}
            for name in rng.sample(["seed", "noise_start", "keys", "decode", "output", "sampling", "keep_logits"],
                                   rng.randrange(0, 4)):
                kwargs[name] = _value(rng)
            if "keys" in kwargs and rng.random() < 0.5 and isinstance(labels, list) and labels:
                kwargs["keys"] = np.zeros((len(labels), NOISE_KEYS), np.int32)
            if "output" in kwargs and rng.random() < 0.5:
                kwargs["output"] = rng.choice(["float", "uint8"])
            if "decode" in kwargs:
                kwargs["decode"] = False  # keep passing calls quick; decoding is tested elsewhere
            try:
                g = pipe.generate(labels, **kwargs)
            except Exception as e:  # noqa: BLE001
                _check_message(e)
                continue
            ok_calls += 1
            n = len(np.asarray(labels))
            assert g.tokens.shape[0] == n and g.tokens.dtype == np.int64
            assert g.tokens.shape[1] == want_tokens
            assert ((g.tokens >= 0) & (g.tokens < pipe.manifest.vocab_size)).all()
        assert ok_calls >= 15
        # after all that, the pipeline still gives the same images as a fresh call
        a = pipe.generate([1, 2], seed=5, decode=False).tokens
    with Pipeline(tiny_artifacts, threads=1) as fresh:
        assert np.array_equal(a, fresh.generate([1, 2], seed=5, decode=False).tokens)


@pytest.mark.parametrize("args", [dict(backend="tensorrt-ish"), dict(backend=3), dict(threads="2"),
                                  dict(threads=0), dict(threads=True), dict(threads=1.5), dict(artifacts=3),
                                  dict(artifacts="/nonexistent/restok-export"), dict(device="cuda:99")])
def test_pipeline_arguments_are_checked(tiny_artifacts, args):
    args = dict(args)
    folder = args.pop("artifacts", tiny_artifacts)
    with pytest.raises(Exception) as e:
        Pipeline(folder, **args)
    _check_message(e.value)


def test_the_pytorch_api_returns_what_it_says_or_raises_a_clear_error():
    """restok.generate (the PyTorch reference) and the model builders under random arguments: tokens of the
    right shape and range, or TypeError/ValueError with a message; afterwards the same tokens as before."""
    torch = pytest.importorskip("torch")
    import restok

    gen = restok.build_generator("tiny", seed=1)
    n_classes, n_tokens, vocab = gen.cfg.num_classes, gen.cfg.block_size, gen.cfg.vocab_size
    before = restok.generate(gen, [1, 2], seed=5)
    rng = random.Random(13)
    ok_calls = 0
    for _ in range(150):
        labels = rng.choice([_value(rng), [rng.randrange(n_classes) for _ in range(rng.randrange(1, 4))]])
        kwargs = {n: _value(rng) for n in rng.sample(["sampling", "seed", "noise_start", "keys", "mode"],
                                                     rng.randrange(0, 3))}
        if "keys" in kwargs and rng.random() < 0.5 and isinstance(labels, list) and labels:
            zeros = np.zeros((len(labels), NOISE_KEYS), rng.choice([np.int32, np.int64]))
            kwargs["keys"] = torch.from_numpy(zeros) if rng.random() < 0.5 else zeros
        if "mode" in kwargs and rng.random() < 0.5:
            kwargs["mode"] = rng.choice(["har", "vanilla"])
        try:
            tokens = restok.generate(gen, labels, **kwargs)
        except Exception as e:  # noqa: BLE001 - the kind of exception is what is tested
            _check_message(e)
            continue
        ok_calls += 1
        assert tokens.shape == (len(np.asarray(labels).reshape(-1)), n_tokens) and tokens.dtype == torch.long
        assert ((tokens >= 0) & (tokens < vocab)).all()
    assert ok_calls >= 15
    assert torch.equal(restok.generate(gen, [1, 2], seed=5), before)
    for build in (restok.build_generator, restok.build_tokenizer):
        for _ in range(40):
            args = [rng.choice([_value(rng), "tiny", "nano"])]
            kwargs = {"seed": _value(rng)} if rng.random() < 0.5 else {}
            try:
                build(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                _check_message(e)
