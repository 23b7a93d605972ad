"""The TensorRT backend's own logic on a simulated device (tests/support/fake_device.py): buffers,
per-profile and per-bucket bindings, the device copies that chain passes, capture and replay (and the
documented rules the simulated device enforces: one context per captured graph, 256-byte aligned tensor
addresses, a capture that fails, FP8 only from sm_89), in-place cache aliasing, dropped inputs, I/O checks
and freeing everything. Engines here run the ONNX graph with ONNX
Runtime, so tokens must equal the ONNX Runtime backend's exactly. This does not test TensorRT (see the GPU
test in tests/tensorrt/test_builder.py and scripts/gpu_check.sh)."""

import json
import shutil
import sys

import numpy as np
import pytest

from restok.tensorrt.builder import BUILD_INFO, batch_profile, build_key, engine_dir, generator_profiles
from restok.manifest import ArtifactError, Manifest
from restok.runtime import Pipeline, SamplingParams
from tests.support.fake_device import FakeCudart, fake_tensorrt

GPU = {"name": "Simulated H200", "compute_capability": "9.0"}  # what FakeCudart reports by default


@pytest.fixture
def device(monkeypatch):
    """Install the simulated device: returns a function that makes fake engines for an export."""
    import restok.tensorrt.backend as trt_backend
    import restok.tensorrt.builder as builder
    import restok.tensorrt.cuda as cuda

    state = {"cudart": FakeCudart()}

    def identity(*_):
        name, major, minor = state["cudart"].gpu
        return {"name": name, "compute_capability": f"{major}.{minor}"}

    monkeypatch.setattr(cuda, "cudart", lambda: state["cudart"])
    for mod, name, value in ((trt_backend, "_cudart", lambda: state["cudart"]), (builder, "gpu_identity", identity)):
        if hasattr(mod, name):  # the layout before restok.tensorrt.cuda (to watch these tests fail on it)
            monkeypatch.setattr(mod, name, value)

    def install(cudart=None, version="10.15.1"):
        state["cudart"] = cudart or state["cudart"]
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(state["cudart"], version))
        return state["cudart"]

    def make_engines(folder, m, dropped=(), aliases=None, version="10.15.1", opt_batch=2, gpu=GPU):
        d = engine_dir(folder, version, gpu)
        d.mkdir(parents=True, exist_ok=True)
        g = m.graphs["generator"]
        al = aliases if aliases is not None else {t.name: t.aliases for t in g.outputs if t.aliases}
        specs = {"generator": {"onnx": str(folder / g.file), "profiles": generator_profiles(m, opt_batch),
                               "dropped": list(dropped), "aliases": al},
                 "decoder": {"onnx": str(folder / m.graphs["decoder"].file),
                             "profiles": [batch_profile(m.graphs["decoder"], m, opt_batch)]}}
        for name, spec in specs.items():
            (d / f"{name}.plan").write_text(json.dumps(spec))
        key = build_key(m, version, gpu, opt_batch)
        (d / BUILD_INFO).write_text(json.dumps({"key": key, "engines": list(specs)}))

    install()
    return install, make_engines


@pytest.fixture
def art(tiny_artifacts, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(tiny_artifacts, d)
    return d


def test_runs_match_onnxruntime(art, device):
    install, make_engines = device
    cu = install()
    make_engines(art, Manifest.read(art))
    ort = Pipeline(art)
    trt = Pipeline(art, "tensorrt")
    for labels, start in (([1, 2, 3], 0), ([4], 3), ([5, 6, 7, 8], 4), ([1, 2, 3], 0)):
        a = ort.generate(labels, seed=11, noise_start=start)
        b = trt.generate(labels, seed=11, noise_start=start)  # one CUDA-graph replay per run
        assert b.fused_seconds > 0 and not b.step_seconds
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.images, b.images), labels
    # buckets 4 (for 3 and 4 images) and 1: two graphs, each captured once; four replays
    assert cu.launches == 4 and sorted(trt.backend.graphs.graphs) == [(1, True), (4, True)]
    # pass by pass (no graph), with logits: the same again
    c = trt.generate([1, 2, 3], seed=11, keep_logits=True)
    d = ort.generate([1, 2, 3], seed=11, keep_logits=True)
    assert np.array_equal(c.tokens, d.tokens)
    assert all(np.array_equal(x, y) for x, y in zip(c.step_logits, d.step_logits))
    # per-image settings in one batch, and the decoder alone
    mixed = [SamplingParams(cfg_scale=1.0), SamplingParams(top_k=3), SamplingParams(temperature=0.5)]
    assert np.array_equal(trt.generate([1, 2, 3], mixed, seed=2).tokens, ort.generate([1, 2, 3], mixed, seed=2).tokens)
    assert np.array_equal(trt.decode(c.tokens[:2]), ort.decode(c.tokens[:2]))
    live = cu.live
    assert live > 0
    trt.close()
    assert cu.live == 0  # every device and pinned allocation freed
    trt.close()  # idempotent


def test_parity_check_on_the_simulated_device(art, device):
    from restok.measure.parity import run_check

    install, make_engines = device
    install()
    make_engines(art, Manifest.read(art))
    r = run_check(art, images=4, backend="tensorrt")
    assert r["passed"], r["summary"]
    assert r["generation"]["identical_images"] == 4 and "skipped" in r["encoder"]  # no encoder engine built


def test_inplace_cache_and_aliasing(tiny_artifacts_inplace, tmp_path, device):
    install, make_engines = device
    install()
    art = tmp_path / "ip"
    shutil.copytree(tiny_artifacts_inplace, art)
    m = Manifest.read(art)
    make_engines(art, m)
    a = Pipeline(art).generate([1, 2], seed=3)
    p = Pipeline(art, "tensorrt")
    assert np.array_equal(p.generate([1, 2], seed=3).tokens, a.tokens)
    assert np.array_equal(p.generate([1, 2], seed=3).tokens, a.tokens)  # stale cache slots stay masked
    p.close()
    make_engines(art, m, aliases={"cache_key_out_0": "cache_value_0"})
    from restok.tensorrt.cuda import CudaError

    with pytest.raises(CudaError, match="did not alias cache_key_out_0 to cache_key_0"):
        Pipeline(art, "tensorrt")


def test_older_tensorrt_runs_the_fallback_graph(tiny_artifacts_inplace, tmp_path, device):
    install, make_engines = device
    install(version="10.3.0")
    art = tmp_path / "ip"
    shutil.copytree(tiny_artifacts_inplace, art)
    fb = Manifest.read(art).kv_cache_view("concat")
    make_engines(art, fb, version="10.3.0")
    with pytest.warns(UserWarning, match="10.3.0 has no in-place"):
        p = Pipeline(art, "tensorrt")
    assert p.backend.manifest.kv_cache == "concat" and "kv.empty.past_key_0" in p.backend.plan.buffers
    assert np.array_equal(p.generate([1, 2], seed=3).tokens, Pipeline(art).generate([1, 2], seed=3).tokens)


def test_dropped_inputs_are_not_bound(art, device):
    """TensorRT drops inputs nothing reads (cfg_scale of a --no-cfg export): the backend binds only the
    engine's own tensors."""
    install, make_engines = device
    install()
    make_engines(art, Manifest.read(art), dropped=["cfg_scale"])
    p = Pipeline(art, "tensorrt")
    p.generate([1], SamplingParams(cfg_scale=1.0), seed=1)
    ctx = p.backend.bound[1]["contexts"][("generator", 4)]
    assert "cfg_scale" not in ctx.addresses and "noise_keys" in ctx.addresses
    same = SamplingParams(cfg_scale=1.0)  # the simulated engine feeds 1.0 where the input was dropped
    assert np.array_equal(p.generate([1, 2], same, seed=1).tokens, Pipeline(art).generate([1, 2], same, seed=1).tokens)


def test_engine_io_must_match_the_manifest(art, device):
    install, make_engines = device
    install()
    make_engines(art, Manifest.read(art))
    graphs = json.loads((art / "manifest.json").read_text())["graphs"]
    for t in graphs["generator"]["inputs"]:
        if t["name"] == "noise_keys":
            t["dtype"] = "int64"
    _rewrite_manifest(art, graphs=graphs)  # a manifest that says int64, as a (mis)export would
    with pytest.raises(ArtifactError, match="noise_keys is int32, the manifest says int64"):
        Pipeline(art, "tensorrt", manifest=Manifest.read(art))


def _rewrite_manifest(art, **fields) -> None:
    """A manifest that says something else (as a re-export would), with its content hash recomputed."""
    from restok.manifest import _content_sha256

    mp = art / "manifest.json"
    d = {**json.loads(mp.read_text()), **fields}
    d["content_sha256"] = _content_sha256(d)
    mp.write_text(json.dumps(d))


# --------------------------------------------------------------- the documented rules (first run on a GPU)


def test_graphs_stay_valid_when_batch_sizes_alternate(art, device):
    """Dynamic batching alternates batch sizes at once. A graph is valid only while its contexts keep the
    shapes they had at capture: binding another batch size on shared contexts would make the next replay
    of the first graph wrong (the simulated device fails that launch)."""
    install, make_engines = device
    cu = install()
    make_engines(art, Manifest.read(art))
    ort, trt = Pipeline(art), Pipeline(art, "tensorrt")
    for labels in ([1], [1, 2, 3, 4], [5, 6, 7], [1, 2, 3, 4], [2], [3, 4]):
        a, b = ort.generate(labels, seed=5), trt.generate(labels, seed=5)
        assert b.fused_seconds > 0 and np.array_equal(a.tokens, b.tokens), labels
    assert cu.launches == 6


def test_inputs_are_bound_at_256_byte_aligned_addresses(art, device):
    """setTensorAddress takes 256-byte aligned addresses: the per-run inputs share one block, each at an
    aligned offset (the simulated TensorRT refuses an unaligned one, as TensorRT does)."""
    install, make_engines = device
    install()
    make_engines(art, Manifest.read(art))
    p = Pipeline(art, "tensorrt")
    g = p.generate([1, 2], seed=3)
    assert np.array_equal(g.tokens, Pipeline(art).generate([1, 2], seed=3).tokens)
    addresses = [a for s in p.backend.bound.values() for ctx in s["contexts"].values() for a in ctx.addresses.values()]
    assert addresses and all(a % 256 == 0 for a in addresses)


def test_a_failed_capture_runs_without_a_graph(art, device, capsys):
    """An enqueue that fails during capture voids the capture and leaves an error pending; the backend ends
    the capture, clears the error and runs that configuration without a graph (as trtexec does)."""
    install, make_engines = device
    cu = install(FakeCudart(fail_in_capture=True))
    make_engines(art, Manifest.read(art))
    ort, trt = Pipeline(art), Pipeline(art, "tensorrt")
    for labels in ([1, 2], [3, 4], [5]):
        assert np.array_equal(trt.generate(labels, seed=2).tokens, ort.generate(labels, seed=2).tokens), labels
    assert cu.launches == 0 and set(trt.backend.graphs.failed) == {(2, True), (1, True)}
    assert capsys.readouterr().err.count("CUDA-graph capture failed") == 2  # said once per configuration
    trt.close()
    assert cu.live == 0


def test_fp8_is_refused_below_compute_capability_8_9(art, device):
    """An A100 (sm_80) or a Jetson Orin (sm_87) has no FP8 tensor cores: loading or building FP8 engines
    there is refused with what to use instead, not left to fail inside TensorRT."""
    from restok.tensorrt.builder import EngineError, build_engines

    install, make_engines = device
    install(FakeCudart(gpu=("Simulated A100", 8, 0)))
    _rewrite_manifest(art, precision="fp8")
    m = Manifest.read(art)
    make_engines(art, m, gpu={"name": "Simulated A100", "compute_capability": "8.0"})
    with pytest.raises(EngineError, match="FP8 engines need compute capability >= 8.9.*8.0.*int8 or fp16"):
        Pipeline(art, "tensorrt")
    with pytest.raises(EngineError, match="FP8 engines need compute capability >= 8.9"):
        build_engines(art)


def test_constructor_failure_frees_what_it_allocated(art, device):
    install, make_engines = device
    make_engines(art, Manifest.read(art))
    for k in (0, 1, 5, 20):
        cu = install(FakeCudart(fail_malloc_after=k))
        with pytest.raises(MemoryError, match="GPU ran out of memory"):
            Pipeline(art, "tensorrt")
        assert cu.live == 0, k
