"""The TensorRT parser-compatibility lint (restok.tensorrt.lint), on a CPU: our exports and Q/DQ graphs pass,
and what TensorRT rejects (or parses only from some version) is caught."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from restok.tensorrt.lint import lint_artifacts, lint_model


@pytest.mark.parametrize("which", ["tiny_artifacts", "tiny_artifacts_fp16", "tiny_artifacts_inplace"])
def test_lint_passes_on_our_exports(request, which):
    reports = lint_artifacts(request.getfixturevalue(which))
    assert set(reports) >= {"generator", "decoder"}
    if which == "tiny_artifacts_inplace":  # the past/present fallback generator is linted too
        assert "generator.concat" in reports
        assert reports["generator"].min_tensorrt == (10, 15) and reports["generator.concat"].min_tensorrt == (10, 3)
    for name, r in reports.items():
        assert r.ok, (name, r.errors[:5])
        # no TopK (K <= 3840), no control flow, no CumSum (a sequential loop in TensorRT < 10.8), no Clip on ints
        assert not {"TopK", "If", "Loop", "CumSum"} & set(r.ops)
        assert 9 <= r.opset <= 24
        if name != "generator" or which != "tiny_artifacts_inplace":
            assert r.min_tensorrt == (10, 3), name  # everything but the in-place generator parses on Jetson's 10.3


def test_lint_passes_on_qdq_graphs(tiny_artifacts, tmp_path):
    from restok.calibration import CalibrationOptions, calibrate

    for precision in ("int8", "fp8"):
        out = tmp_path / precision
        calibrate(tiny_artifacts, out, CalibrationOptions(precision=precision, samples=2, gate_images=2,
                                                         min_token_agreement=0, min_psnr=0), threads=1)
        for name, r in lint_artifacts(out).items():
            assert r.ok, (precision, name, r.errors[:5])
            assert r.ops.get("DequantizeLinear", 0) > 0 or name == "encoder"


def _graph(nodes, inputs, outputs, inits=(), opset=20):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_catches_what_tensorrt_rejects():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    i = helper.make_tensor_value_info("i", TensorProto.INT64, None)
    k = numpy_helper.from_array(np.array([4000], np.int64), "k")
    bad_topk = lint_model(_graph([helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1)], [x], [y, i], [k]))
    assert any("below 3840" in e for e in bad_topk.errors)
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(3, np.int8), "z")
    q = lint_model(_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], [x], [y], [s, z]))
    assert sum("zero point" in e for e in q.errors) == 2
    u = lint_model(_graph([helper.make_node("Unique", ["x"], ["y"])], [x], [y]))
    assert any("not supported" in e for e in u.errors)
    old = lint_model(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=25))
    assert any("opset 25" in e for e in old.errors)
    d = helper.make_tensor_value_info("d", TensorProto.DOUBLE, [2, 8])
    dbl = lint_model(_graph([helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
                             helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)], [x], [y]))
    assert any("float64" in e for e in dbl.errors)
    loop_free = lint_model(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y]))
    assert loop_free.ok and not loop_free.warnings
    ints = helper.make_tensor_value_info("c", TensorProto.INT64, [2, 8])
    clip = lint_model(_graph([helper.make_node("Clip", ["c"], ["y"])], [ints], [y]))
    assert any("input type int64" in e for e in clip.errors)
    del d


def test_lint_checks_the_kv_cache_update():
    """TensorRT's KV-cache update takes a float cache straight from a network input to a network output."""
    def scatter(dtype, through_identity=False):
        cache = helper.make_tensor_value_info("cache", dtype, [2, 4, 16, 8])
        upd = helper.make_tensor_value_info("upd", dtype, [2, 4, 1, 8])
        idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2])
        out = helper.make_tensor_value_info("out", dtype, [2, 4, 16, 8])
        nodes = [helper.make_node("TensorScatter", ["cache2" if through_identity else "cache", "upd", "idx"], ["out"],
                                  axis=-2, mode="linear")]
        if through_identity:
            nodes.insert(0, helper.make_node("Identity", ["cache"], ["cache2"]))
        return lint_model(_graph(nodes, [cache, upd, idx], [out], opset=24))

    assert scatter(TensorProto.FLOAT).ok and scatter(TensorProto.FLOAT).min_tensorrt == (10, 15)
    assert any("input type int32" in e for e in scatter(TensorProto.INT32).errors)
    assert any("must be a network input" in e for e in scatter(TensorProto.FLOAT16, through_identity=True).errors)
