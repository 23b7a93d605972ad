"""Calibration (restok.calibration.calibrator): the manifest's calibration record, fp8, weight-only and
dynamic int8, percentile ranges, refusing non-fp32 input, and the quality gate refusing a broken
calibration."""

import onnx
import pytest
from onnx import numpy_helper

from restok.calibration import CalibrationOptions, calibrate
from restok.manifest import Manifest
from tests.support.calibration import PERMISSIVE


def test_manifest_records_calibration(int8_artifacts, tiny_artifacts):
    m = Manifest.read(int8_artifacts)
    c = m.calibration
    assert m.precision == "int8" and c["method"] == "max" and c["samples"] == 4
    assert c["graphs"]["generator"]["quantized_nodes"] == 16
    excluded = list(c["graphs"]["generator"]["excluded"].values())
    assert "LM head (output)" in excluded and excluded.count("SwiGLU down projection (activation outliers)") == 4
    assert c["graphs"]["decoder"]["quantized_nodes"] > 0
    assert "onnxruntime" in m.tools and c["quality"]["images"] == 4
    assert set(c["from_sha256"]) == set(Manifest.read(tiny_artifacts).files)


@pytest.mark.parametrize("precision", ["fp8", "int8-weight-only"])
def test_other_precisions(tiny_artifacts, tmp_path, precision):
    out = tmp_path / precision
    r = calibrate(tiny_artifacts, out, CalibrationOptions(precision=precision, **PERMISSIVE), threads=1)
    assert r["passed"] and 0.0 < r["quality"]["token_agreement"] <= 1.0
    m = Manifest.read(out)
    g = m.calibration["graphs"]["generator"]
    model = onnx.load(str(out / m.graphs["generator"].file))
    dtypes = {t.data_type for t in model.graph.initializer}
    if precision == "fp8":
        assert onnx.TensorProto.FLOAT8E4M3FN in dtypes and g["activation_qdq"] > 0
    else:
        assert onnx.TensorProto.INT8 in dtypes and g["activation_qdq"] == 0
        assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_gate_rejects_a_broken_calibration(tiny_artifacts, tmp_path, monkeypatch, capsys):
    import restok.calibration.calibrator as cal
    from restok.cli import main

    real = cal.activation_ranges

    def broken(*a, **k):  # ranges 1000x too small: every activation saturates
        return {t: v / 1000 for t, v in real(*a, **k).items()}

    monkeypatch.setattr(cal, "activation_ranges", broken)
    out = tmp_path / "broken"
    rc = main(["calibrate", "--artifacts", str(tiny_artifacts), "--precision", "int8", "--samples", "4",
               "--gate-images", "4", "--out", str(out), "--json", str(tmp_path / "report.json")])
    assert rc == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert "FAIL" in capsys.readouterr().err
    import json

    r = json.loads((tmp_path / "report.json").read_text())
    assert not r["passed"] and r["quality"]["token_agreement"] < 0.9


def test_calibration_needs_fp32(tiny_artifacts_fp16, tmp_path):
    from restok.manifest import ArtifactError

    with pytest.raises(ArtifactError, match="starts from fp32"):
        calibrate(tiny_artifacts_fp16, tmp_path / "x", CalibrationOptions(precision="int8"))


def test_int8_dynamic_for_onnxruntime(tiny_artifacts, tmp_path):
    """The CPU path: linear layers become DynamicQuantizeMatMul (8-bit weights stored as uint8 with zero point
    128, so ONNX Runtime's u8u8 kernel runs: no int16 saturation on AVX2-only CPUs; per-call activation ranges);
    the LM head and the attention BMMs stay FP32; TensorRT refuses the artifacts with what to do instead."""
    from restok.tensorrt.builder import EngineError, tensorrt_manifest
    from restok.tensorrt.lint import lint_artifacts

    out = tmp_path / "dyn"
    r = calibrate(tiny_artifacts, out, CalibrationOptions(precision="int8-dynamic", **PERMISSIVE), threads=1)
    m = Manifest.read(out)
    assert m.precision == "int8-dynamic" and m.calibration["method"].startswith("dynamic")
    assert m.calibration["samples"] == 0  # nothing traced: ranges are measured per call
    model = onnx.load(str(out / m.graphs["generator"].file))
    inits = {t.name: t for t in model.graph.initializer}
    dyn = [n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(dyn) == 4 * 4 and all(n.domain == "com.microsoft" for n in dyn)
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 and len(inits[n.input[2]].dims) == 1 for n in dyn)
    assert all(len(n.input) == 4 and set(onnx.numpy_helper.to_array(inits[n.input[3]]).tolist()) == {128} for n in dyn)
    fp32_mm = [tuple(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert sorted(fp32_mm) == [(128, 1024)] + [(512, 128)] * 4  # the LM head and the down projections
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    # close to FP32 on real pass inputs, but not identical (it did quantize), with logits that vary
    q = r["quality"]
    for s in q["steps"]:
        assert s["logits_std"] > 0.1
        assert 0 < s["logits_max_abs_error"] < 0.5 * s["logits_std"], s
        assert s["logits_mean_abs_error"] < 0.05 * s["logits_std"], s
    # random weights: near-uniform logits flip easily (the trained bundled model measures 96.4% / 57 dB)
    assert q["decoder_psnr_db"] > 25 and q["token_agreement"] > 0.5
    with pytest.raises(EngineError, match="calibrate --precision int8"):
        tensorrt_manifest(m, "10.15.1")
    assert any("custom domain" in e for rep in lint_artifacts(out).values() for e in rep.errors)


def test_percentile_ranges_clip_outliers(int8_artifacts, tiny_artifacts, tmp_path):
    """--method percentile: every activation range is at most the 'max' range, and some are smaller."""
    out = tmp_path / "p99"
    calibrate(tiny_artifacts, out, CalibrationOptions(precision="int8", method="percentile", percentile=99.0, **PERMISSIVE),
              threads=1)
    m = Manifest.read(out)
    assert m.calibration["method"] == "percentile 99"

    def act_scales(folder):
        model = onnx.load(str(folder / Manifest.read(folder).graphs["generator"].file))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in inits}

    a, b = act_scales(int8_artifacts), act_scales(out)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(b[k] <= a[k] * (1 + 1e-6) for k in a)
    assert sum(b[k] < 0.9 * a[k] for k in a) >= len(a) // 2
    with pytest.raises(ValueError, match="percentile"):
        CalibrationOptions(percentile=10).validate(Manifest.read(tiny_artifacts))
