"""TensorRT: what a CPU can check (the parser-compatibility lint of our graphs, engine-cache keys and the
refusal of stale engines, static profiles from the schedule, the CLI's handling), and GPU tests that run
only where TensorRT and a CUDA device exist."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from restok.engines.builder import BUILD_INFO, EngineError, build_key, check_engines, engine_dir, step_profiles
from restok.engines.lint import lint_artifacts, lint_model
from restok.manifest import Manifest

GPU = {"name": "NVIDIA H200", "compute_capability": "9.0"}


def _has_trt_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (GPU machines only)"
    try:
        from restok.engines.builder import gpu_identity

        gpu_identity()
    except Exception as e:  # no driver, no device
        return f"no CUDA device: {e}"
    return None


NO_GPU = _has_trt_gpu()


@pytest.mark.parametrize("which", ["tiny_artifacts", "tiny_artifacts_fp16", "tiny_artifacts_inplace"])
def test_lint_passes_on_our_exports(request, which):
    reports = lint_artifacts(request.getfixturevalue(which))
    assert set(reports) >= {f"step{i}" for i in range(9)} | {"decoder"}
    if which == "tiny_artifacts_inplace":  # the past/present fallback set is linted too
        assert set(reports) >= {f"step{i}.concat" for i in range(9)}
    for name, r in reports.items():
        assert r.ok, (name, r.errors[:5])
        assert "TopK" not in r.ops and "If" not in r.ops and "Loop" not in r.ops
        assert 9 <= r.opset <= 24


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
    del d


def test_static_profiles_follow_the_schedule(tiny_artifacts):
    m = Manifest.read(tiny_artifacts)
    prof = step_profiles(m)
    for st in m.har_schedule().steps:
        p = prof[f"step{st.index}"]
        mn, opt, mx = p["noise"]
        assert mn == opt == mx == (m.batch, st.num_new, m.vocab_size)
        if st.cached:
            assert p["past_key_0"][0][2] == st.cached


def test_engine_cache_keys_and_refusals(tiny_artifacts, tmp_path):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(tiny_artifacts, folder)
    m = Manifest.read(folder)
    with pytest.raises(EngineError, match="no engines for TensorRT 10.15.0 on NVIDIA H200.*restok build"):
        check_engines(folder, m, "10.15.0", GPU)
    d = engine_dir(folder, "10.15.0", GPU)
    d.mkdir(parents=True)
    for name in m.graphs:
        (d / f"{name}.plan").write_bytes(b"plan")
    key = build_key(m, "10.15.0", GPU)
    (d / BUILD_INFO).write_text(json.dumps({"key": key}))
    assert check_engines(folder, m, "10.15.0", GPU) == d
    # another GPU or TensorRT version has its own folder; a changed ONNX file is refused
    with pytest.raises(EngineError, match="no engines"):
        check_engines(folder, m, "11.1.0", GPU)
    stale = dict(key, onnx_sha256={**key["onnx_sha256"], "step3": "0" * 64})
    (d / BUILD_INFO).write_text(json.dumps({"key": stale}))
    with pytest.raises(EngineError, match="different onnx_sha256.*restok build"):
        check_engines(folder, m, "10.15.0", GPU)
    (d / BUILD_INFO).write_text(json.dumps({"key": key}))
    (d / "decoder.plan").unlink()
    with pytest.raises(EngineError, match=r"decoder\.plan is missing"):
        check_engines(folder, m, "10.15.0", GPU)


@pytest.mark.skipif(NO_GPU is None, reason="TensorRT and a GPU are present: the CLI would build")
def test_cli_without_tensorrt(tiny_artifacts, tmp_path, capsys):
    from restok.cli import main

    assert main(["build", "--artifacts", str(tiny_artifacts)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(tiny_artifacts), "--precision", "fp16"]) == 2
    assert "holds fp32 graphs, not fp16" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(tiny_artifacts), "--batch", "4"]) == 2
    assert "exported for batch 2" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--backend", "tensorrt", "--out", str(tmp_path)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(tiny_artifacts), "--opt-level", "9"]) == 2


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_tensorrt_engines_match_the_reference(tiny_artifacts_fp16):
    from restok.engines.builder import build_engines
    from restok.parity import run_check

    build_engines(tiny_artifacts_fp16)
    r = run_check(tiny_artifacts_fp16, images=4, backend="tensorrt", device="cuda")
    assert r["generation"]["token_agreement"] > 0.9, r["summary"]
    assert r["decoder"]["psnr_db"] > 30, r["summary"]


def test_tensorrt_version_gates(tiny_artifacts, tiny_artifacts_inplace):
    import dataclasses

    from restok.engines.builder import tensorrt_manifest

    inplace = Manifest.read(tiny_artifacts_inplace)
    assert tensorrt_manifest(inplace, "10.15.1") is inplace
    # older TensorRT 10.x: the export's past/present set, with a warning that names the version
    with pytest.warns(UserWarning, match="TensorRT 10.3.0 has no in-place KV-cache update"):
        fb = tensorrt_manifest(inplace, "10.3.0")
    assert fb.kv_cache == "concat" and fb.opset == 20 and fb.step_graph(0).file == "generator/step0.concat.onnx"
    assert build_key(fb, "10.3.0", GPU)["kv_cache"] == "concat"
    bare = dataclasses.replace(inplace, fallback={})
    with pytest.raises(EngineError, match="TensorRT 10.3.0 cannot parse the in-place KV cache.*--kv-cache concat"):
        tensorrt_manifest(bare, "10.3.0")
    concat = Manifest.read(tiny_artifacts)
    assert tensorrt_manifest(concat, "10.3.0") is concat  # past/present graphs: any TensorRT 10.x
    with pytest.raises(EngineError, match="too old"):
        tensorrt_manifest(concat, "8.6.1")
