"""The runtime pipeline (restok.runtime.pipeline): it runs without torch, image k of a run is the same in any
batch, sampling settings are per-image inputs that follow the reference, and bad labels, batch sizes and
encoder input are refused with a message that names the problem."""

import subprocess
import sys

import numpy as np
import pytest

from restok.runtime import Pipeline, SamplingParams
from tests.support.torchless import TORCH_BLOCK


def test_runtime_without_torch(tiny_artifacts, tmp_path):
    ref = Pipeline(tiny_artifacts, "torch").generate([3, 7], seed=4)
    code = TORCH_BLOCK + f"""
import numpy as np
from restok.runtime import Pipeline
g = Pipeline({str(tiny_artifacts)!r}).generate([3, 7], seed=4)
np.save({str(tmp_path / 'tok.npy')!r}, g.tokens)
np.save({str(tmp_path / 'img.npy')!r}, g.images)
assert "torch" not in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "tok.npy"), ref.tokens)
    assert np.abs(np.load(tmp_path / "img.npy") - ref.images).max() < 1e-3


def test_batch_invariance(tiny_artifacts):
    """Image k of a run is the same, bit for bit, generated alone or in a batch of any size."""
    p = Pipeline(tiny_artifacts)
    labels = [3, 1, 4, 1]
    full = p.generate(labels, seed=7)
    for k in range(4):
        solo = p.generate([labels[k]], seed=7, noise_start=k)
        assert np.array_equal(solo.tokens[0], full.tokens[k]) and np.array_equal(solo.images[0], full.images[k]), k
    mid = p.generate(labels[1:3], seed=7, noise_start=1)
    assert np.array_equal(mid.images, full.images[1:3])
    again = p.generate(labels, seed=7)  # stale buffers from smaller runs change nothing
    assert np.array_equal(again.tokens, full.tokens)


def test_sampling_parameters_are_per_image_inputs(tiny_artifacts):
    """One export serves every sampling setting, one batch mixes settings, and ONNX Runtime follows the
    reference for each."""
    ort, ref = Pipeline(tiny_artifacts), Pipeline(tiny_artifacts, "torch")
    settings = [SamplingParams(cfg_scale=1.0, top_p=1.0), SamplingParams(top_k=5, top_p=1.0, temperature=0.7),
                SamplingParams(cfg_schedule="linear", cfg_scale=2.0, top_p=0.5), SamplingParams()]
    mixed = ort.generate([1, 2, 3, 4], settings, seed=9)
    assert np.array_equal(mixed.tokens, ref.generate([1, 2, 3, 4], settings, seed=9).tokens)
    for k, sp in enumerate(settings):
        alone = ort.generate([k + 1], sp, seed=9, noise_start=k)
        assert np.array_equal(alone.tokens[0], mixed.tokens[k]), sp
    assert len({mixed.tokens[k].tobytes() for k in range(4)}) == 4
    greedy = ort.generate([1, 2], SamplingParams(top_k=1), seed=1).tokens
    assert np.array_equal(greedy, ort.generate([1, 2], SamplingParams(top_k=1), seed=2).tokens)


def test_bad_labels_and_batch(tiny_artifacts):
    p = Pipeline(tiny_artifacts)
    with pytest.raises(ValueError, match=r"class ids \[10\] are outside \[0, 10\)"):
        p.generate([1, 10])
    with pytest.raises(ValueError, match="non-empty"):
        p.generate([])


def test_encode_checks_dtype_and_range(tiny_artifacts):
    p = Pipeline(tiny_artifacts)
    x = np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float32)
    assert p.encode(x).shape == (2, 128)
    with pytest.raises(ValueError, match="divide uint8 pixels by 255"):
        p.encode((x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="divide uint8 pixels by 255"):  # in range, but integers: the dtype says
        p.encode((x > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        p.encode(x * 255)
    with pytest.raises(ValueError, match=r"shape \[n, 3, 32, 32\]"):
        p.encode(x[:, :, :16])


def test_any_number_of_images_in_runs_of_the_max_batch(tiny_artifacts):
    """Pipeline.generate splits the images into runs of at most max batch and keeps image k on stream
    noise_start + k: the result is the same however it is split."""
    from restok.noise import noise_keys

    p = Pipeline(tiny_artifacts)
    assert p.max_batch == 4
    labels = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    g = p.generate(labels, seed=7)
    assert g.runs == 3 and g.tokens.shape == (9, 128) and g.images.shape == (9, 3, 32, 32)
    assert len(g.step_seconds) == 9  # per pass, summed over the runs
    assert [len(r.tokens) for r in p.runs(labels, seed=7, decode=False)] == [4, 4, 1]
    assert np.array_equal(p.generate(labels[5:], seed=7, noise_start=5).tokens, g.tokens[5:])
    for k in (0, 4, 8):
        assert np.array_equal(p.generate([labels[k]], seed=7, noise_start=k).tokens[0], g.tokens[k])
    assert np.array_equal(p.generate(labels, keys=noise_keys(7, 9), decode=False).tokens, g.tokens)
    per_image = [SamplingParams(top_k=k) for k in range(9)]
    mixed = p.generate(labels, per_image, seed=7, decode=False)
    assert np.array_equal(mixed.tokens[6], p.generate([7], per_image[6], seed=7, noise_start=6).tokens[0])
    assert np.array_equal(p.decode(g.tokens), g.images)  # decoding chunks the same way
    with pytest.raises(ValueError, match="keep_logits keeps one run's logits: at most 4 images"):
        p.generate(labels, keep_logits=True)
    with pytest.raises(ValueError, match="one per image"):
        p.generate(labels, per_image[:3])


def test_one_pipeline_shared_by_threads(tiny_artifacts):
    """A Pipeline may be shared: concurrent calls wait for each other's runs and each gets its own images."""
    import threading

    p = Pipeline(tiny_artifacts)
    calls = [([k % 10, (k + 3) % 10], k) for k in range(6)]
    want = {seed: p.generate(labels, seed=seed) for labels, seed in calls}
    wrong = []

    def work(offset):
        for i in range(12):
            labels, seed = calls[(offset + i) % len(calls)]
            g = p.generate(labels, seed=seed)
            if not (np.array_equal(g.tokens, want[seed].tokens) and np.array_equal(g.images, want[seed].images)):
                wrong.append(seed)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 36 calls got another call's images"


def test_a_closed_pipeline_says_so(tiny_artifacts):
    p = Pipeline(tiny_artifacts)
    p.close()
    p.close()  # idempotent
    with pytest.raises(RuntimeError, match="this Pipeline is closed"):
        p.generate([1])
