"""The cuda backend (restok.runtime.cuda_backend) with device="cpu": the same class and the same code as on
a GPU, minus capture and replay (which need one: scripts/gpu_check.sh). Tokens equal ONNX Runtime's on the
bundled trained model, padded buckets change nothing, one host copy per run, the bf16 gate."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from restok.images import to_uint8  # noqa: E402
from restok.runtime import Pipeline, SamplingParams  # noqa: E402
from tests.support.cli import ENV  # noqa: E402

LABELS = [3, 1, 4, 1, 5, 9, 2]


@pytest.fixture(scope="module")
def pipes(bundled_artifacts):
    ort, cuda = Pipeline(bundled_artifacts), Pipeline(bundled_artifacts, "cuda", device="cpu")
    yield ort, cuda
    ort.close()
    cuda.close()


def test_tokens_equal_onnxruntime(pipes):
    ort, cuda = pipes
    assert cuda.backend.precision == "fp32" and not cuda.backend.use_graphs  # a CPU: fp32, no graphs
    a, b = ort.generate(LABELS, seed=7), cuda.generate(LABELS, seed=7)
    assert b.fused_seconds > 0 and not b.step_seconds  # the whole run in one go, as a graph would run it
    assert np.array_equal(a.tokens, b.tokens)
    assert np.abs(a.images - b.images).max() < 1e-4
    mixed = [SamplingParams(), SamplingParams(top_k=50, temperature=0.8), SamplingParams(cfg_scale=1.0, top_p=1.0)]
    assert np.array_equal(ort.generate([1, 2, 3], mixed, seed=4).tokens, cuda.generate([1, 2, 3], mixed, seed=4).tokens)
    # uint8 images made on the device are what restok.images.to_uint8 makes of its float images
    assert np.array_equal(cuda.generate(LABELS[:2], seed=7, output="uint8").images, to_uint8(b.images[:2]))


def test_pass_by_pass_equals_the_fused_run(pipes):
    """With logits kept the backend runs pass by pass (no graph): the same tokens, ONNX Runtime's logits."""
    ort, cuda = pipes
    fused = cuda.generate([1, 2, 3], seed=4, decode=False)
    a = cuda.generate([1, 2, 3], seed=4, keep_logits=True, decode=False)
    b = ort.generate([1, 2, 3], seed=4, keep_logits=True, decode=False)
    assert np.array_equal(a.tokens, fused.tokens) and np.array_equal(a.tokens, b.tokens)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a.step_logits, b.step_logits)) < 1e-3


def test_padded_buckets_change_nothing(pipes):
    """3 images run padded to the bucket of 4: the first 3 images of a run of 4 are the same bytes, and
    every image generated alone (bucket 1) has the same tokens. Its pixels are the same up to float
    rounding: the decoder's matrix products at batch 1 and batch 4 round differently (about 1e-6), which
    can move a pixel that sits on a rounding boundary by one level (seen on CI's CPU)."""
    _, cuda = pipes
    three, four = cuda.generate(LABELS[:3], seed=7), cuda.generate(LABELS[:4], seed=7)
    assert cuda.backend.bucket == 4
    assert np.array_equal(three.tokens, four.tokens[:3]) and np.array_equal(three.images, four.images[:3])
    alone = [cuda.generate([c], seed=7, noise_start=k, output="uint8") for k, c in enumerate(LABELS[:3])]
    assert all(np.array_equal(g.tokens[0], three.tokens[k]) for k, g in enumerate(alone))
    diffs = [np.abs(g.images[0].astype(int) - to_uint8(three.images)[k].astype(int)) for k, g in enumerate(alone)]
    assert max(int(d.max()) for d in diffs) <= 1 and sum(int((d > 0).sum()) for d in diffs) <= 8


def test_one_host_copy_per_run(pipes):
    """Every op of a run that touches the pinned input block: exactly one copy of it into the device block
    (the per-run inputs cross once); the results come back in one copy each."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, cuda = pipes
    be = cuda.backend
    blocks = {"host": be.host_block, "tokens": be.out_tokens, "images": be.out_images["uint8"]}

    def touches(t, block):
        if not isinstance(t, torch.Tensor):
            return False
        lo = block.untyped_storage().data_ptr()
        return lo <= t.untyped_storage().data_ptr() < lo + block.untyped_storage().nbytes()

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [*args, *(kwargs or {}).values()]
            for name, block in blocks.items():
                if any(touches(a, block) for a in flat):
                    self.seen.append((name, str(func.overloadpacket), touches(args[0], be.device_block)))
            return func(*args, **(kwargs or {}))

    be.set_inputs(cuda._run_inputs(np.array([1, 2, 3]), [SamplingParams()] * 3, np.ones((3, 8), np.int32)))
    with Ops() as ops:
        be.run_fused(decode=True, output="uint8")
    host = [s for s in ops.seen if s[0] == "host"]
    assert host == [("host", "aten.copy_", True)], ops.seen
    copies = [s[0] for s in ops.seen if s[0] != "host" and s[1] == "aten.copy_"]
    assert copies == ["tokens", "images"], ops.seen


def test_bf16_passes_the_gate_on_the_bundled_model(bundled_artifacts):
    """bf16 (the GPU default) against the fp32 reference: the gate of every fast configuration (95% of
    tokens, 40 dB). Measured here on 64 images: 98.0% / 52.1 dB (a bf16 LM head gave 94.5%: the head and the
    final norm stay fp32)."""
    from restok.measure.parity import run_check

    r = run_check(bundled_artifacts, images=16, backend="cuda", device="cpu", compute_precision="bf16")
    assert r["precision"] == "bf16" and r["thresholds"]["min_token_agreement"] == 0.95
    assert r["passed"], r["summary"]
    assert r["generation"]["token_agreement"] < 1.0  # it did compute in bf16


def test_cli_generate_with_the_cuda_backend(bundled_artifacts, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "restok", "generate", "--artifacts", str(bundled_artifacts),
                        "--backend", "cuda", "--device", "cpu", "--classes", "1", "2", "--out", str(out)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    want = Pipeline(bundled_artifacts).generate([1, 2]).tokens
    assert np.array_equal(np.load(out / "tokens.npy"), want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_is_an_environment_error(bundled_artifacts, tmp_path):
    r = subprocess.run([sys.executable, "-m", "restok", "generate", "--artifacts", str(bundled_artifacts),
                        "--backend", "cuda", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 3 and "needs a CUDA device" in r.stderr and len(r.stderr.strip().splitlines()) == 1
