"""The OpenVINO backend: fp32 draws exactly the ONNX Runtime tokens (through every batch size and pass shape),
in-place exports run their past/present fallback, and bf16 passes the CPU quality gate on the bundled
trained model."""

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'restok[openvino]'")

from restok.cli import main  # noqa: E402
from restok.runtime import Pipeline  # noqa: E402
from restok.runtime.openvino_backend import cpu_has_bf16  # noqa: E402


def test_fp32_equals_onnxruntime(tiny_artifacts):
    ort, ov = Pipeline(tiny_artifacts), Pipeline(tiny_artifacts, "openvino", compute_precision="fp32")
    assert ov.backend.precision == "fp32"
    for labels, start in (([1, 2, 3], 0), ([4], 3), ([5, 6, 7, 8], 4), ([1, 2, 3], 0)):
        a, b = ort.generate(labels, seed=3, noise_start=start), ov.generate(labels, seed=3, noise_start=start)
        assert np.array_equal(a.tokens, b.tokens), labels
        assert np.abs(a.images - b.images).max() < 1e-4


def test_inplace_exports_run_their_fallback(tiny_artifacts_inplace):
    ov = Pipeline(tiny_artifacts_inplace, "openvino", compute_precision="fp32")
    assert ov.backend.manifest.kv_cache == "concat"
    assert np.array_equal(ov.generate([1, 2], seed=3).tokens, Pipeline(tiny_artifacts_inplace).generate([1, 2], seed=3).tokens)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions (AVX-512 BF16 or AMX)")
def test_bf16_passes_the_cpu_gate_on_the_bundled_model(bundled_artifacts, tmp_path):
    """The gate of restok check for openvino: 95% of sampled tokens and decoder PSNR 40 dB against the
    float32 reference (measured: 96-97% and 53 dB)."""
    out = tmp_path / "check.json"
    assert main(["check", "--artifacts", str(bundled_artifacts), "--backend", "openvino", "--compute-precision", "bf16",
                 "--images", "32", "--json", str(out), "--polygraphy-dir", str(tmp_path / "pg")]) == 0
    import json

    r = json.loads(out.read_text())
    assert r["precision"] == "bf16" and r["passed"]
    assert {c["name"] for c in r["checks"]} == {"token agreement", "decoder PSNR dB"}
