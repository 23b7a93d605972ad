"""TensorRT engines (restok.tensorrt.builder): what a CPU can check (static profiles from the schedule,
engine-cache keys and the refusal of stale engines, version gates, the CLI's handling), and a GPU test that
runs only where TensorRT and a CUDA device exist."""

import json

import pytest

from restok.tensorrt.builder import BUILD_INFO, EngineError, build_key, check_engines, engine_dir, generator_profiles
from restok.manifest import Manifest


GPU = {"name": "NVIDIA H200", "compute_capability": "9.0"}


def _has_trt_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (GPU machines only)"
    try:
        from restok.tensorrt.builder import gpu_identity

        gpu_identity()
    except Exception as e:  # no driver, no device
        return f"no CUDA device: {e}"
    return None


NO_GPU = _has_trt_gpu()


def test_profiles_follow_the_schedule(tiny_artifacts):
    """One profile per pass: its new positions and cached length fixed, the batch from 1 to max batch."""
    m = Manifest.read(tiny_artifacts)
    prof = generator_profiles(m, opt_batch=2)
    assert len(prof) == 9
    for st, p in zip(m.har_schedule().steps, prof):
        assert p["tokens"] == ((2, st.num_new), (4, st.num_new), (8, st.num_new))
        assert p["noise_keys"] == ((1, 8), (2, 8), (4, 8))
        assert p["positions"][0] == p["positions"][2] == (st.num_new,)
        assert p["past_key_0"] == tuple((r, 4, st.cached, 32) for r in (2, 4, 8))  # 0 for the first pass


def test_engine_cache_keys_and_refusals(tiny_artifacts, tmp_path):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(tiny_artifacts, folder)
    m = Manifest.read(folder)
    with pytest.raises(EngineError, match="no engines for TensorRT 10.15.0 on NVIDIA H200.*restok build"):
        check_engines(folder, m, "10.15.0", GPU)
    d = engine_dir(folder, "10.15.0", GPU)
    d.mkdir(parents=True)
    for name in ("generator", "decoder"):
        (d / f"{name}.plan").write_bytes(b"plan")
    key = build_key(m, "10.15.0", GPU)
    (d / BUILD_INFO).write_text(json.dumps({"key": key, "engines": ["generator", "decoder"]}))
    assert check_engines(folder, m, "10.15.0", GPU)[0] == d
    # another GPU or TensorRT version has its own folder; a changed ONNX file is refused
    with pytest.raises(EngineError, match="no engines"):
        check_engines(folder, m, "11.1.0", GPU)
    stale = dict(key, onnx_sha256={**key["onnx_sha256"], "generator": "0" * 64})
    (d / BUILD_INFO).write_text(json.dumps({"key": stale, "engines": ["generator", "decoder"]}))
    with pytest.raises(EngineError, match="different onnx_sha256.*restok build"):
        check_engines(folder, m, "10.15.0", GPU)
    (d / BUILD_INFO).write_text(json.dumps({"key": key, "engines": ["generator", "decoder"]}))
    (d / "decoder.plan").unlink()
    with pytest.raises(EngineError, match=r"decoder\.plan is missing"):
        check_engines(folder, m, "10.15.0", GPU)


@pytest.mark.skipif(NO_GPU is None, reason="TensorRT and a GPU are present: the CLI would build")
def test_cli_without_tensorrt(tiny_artifacts, tmp_path, capsys):
    from restok.cli import main

    assert main(["build", "--artifacts", str(tiny_artifacts)]) == 3  # the environment lacks TensorRT
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(tiny_artifacts), "--precision", "fp16"]) == 2
    assert "holds fp32 graphs, not fp16" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(tiny_artifacts), "--opt-batch", "9"]) == 2
    assert "--opt-batch must be in 1..4" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--backend", "tensorrt", "--out", str(tmp_path / "o")]) == 3
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert main(["build", "--artifacts", str(tiny_artifacts), "--opt-level", "9"]) == 2


@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_tensorrt_engines_match_the_reference(tiny_artifacts_fp16):
    from restok.tensorrt.builder import BuildOptions, build_engines
    from restok.measure.parity import run_check

    build_engines(tiny_artifacts_fp16, BuildOptions(encoder=True))
    r = run_check(tiny_artifacts_fp16, images=4, backend="tensorrt", reference_device="cuda")
    assert r["generation"]["token_agreement"] > 0.9, r["summary"]
    assert r["decoder"]["psnr_db"] > 30, r["summary"]


def test_tensorrt_version_gates(tiny_artifacts, tiny_artifacts_inplace):
    import dataclasses

    from restok.tensorrt.builder import tensorrt_manifest

    inplace = Manifest.read(tiny_artifacts_inplace)
    assert tensorrt_manifest(inplace, "10.15.1") is inplace
    # older TensorRT 10.x: the export's past/present set, with a warning that names the version
    with pytest.warns(UserWarning, match="TensorRT 10.3.0 has no in-place KV-cache update"):
        fb = tensorrt_manifest(inplace, "10.3.0")
    assert fb.kv_cache == "concat" and fb.opset == 20 and fb.graphs["generator"].file == "generator/generator.concat.onnx"
    assert build_key(fb, "10.3.0", GPU)["kv_cache"] == "concat"
    bare = dataclasses.replace(inplace, fallback={})
    with pytest.raises(EngineError, match="TensorRT 10.3.0 cannot parse the in-place KV cache.*--kv-cache concat"):
        tensorrt_manifest(bare, "10.3.0")
    concat = Manifest.read(tiny_artifacts)
    assert tensorrt_manifest(concat, "10.3.0") is concat  # past/present graphs: any TensorRT 10.x
    with pytest.raises(EngineError, match="too old"):
        tensorrt_manifest(concat, "8.6.1")
    # fp32 attention at opset >= 23 is ONNX Attention: TensorRT parses it from 10.14
    g = dataclasses.replace(concat.graphs["decoder"], opset=23)
    at23 = dataclasses.replace(concat, graphs={**concat.graphs, "decoder": g})
    with pytest.raises(EngineError, match="opset 23.*Attention.*10.14.*--opset 20"):
        tensorrt_manifest(at23, "10.12.0")
    assert tensorrt_manifest(at23, "10.14.1") is at23
