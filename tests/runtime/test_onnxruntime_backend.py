"""The ONNX Runtime backend (restok.runtime.onnxruntime_backend) on an in-place KV-cache export (TensorScatter,
opset 24): the same tokens as the past/present graph with one buffer per cache, and the past/present
fallback that shares its weights."""

import numpy as np
import onnx

from restok.manifest import Manifest
from restok.measure.parity import run_check
from restok.runtime import Pipeline


def test_inplace_kv_cache(tiny_artifacts_inplace, tiny_artifacts):
    m = Manifest.read(tiny_artifacts_inplace)
    assert m.kv_cache == "inplace" and m.opset == 24 and m.graphs["decoder"].opset == 20
    g = m.graphs["generator"]
    assert g.input("cache_key_0").shape == g.output("cache_key_out_0").shape == ("rows", 4, 128, 32)
    assert g.output("cache_key_out_0").aliases == "cache_key_0"
    model = onnx.load(str(tiny_artifacts_inplace / g.file), load_external_data=False)
    assert sum(n.op_type == "TensorScatter" for n in model.graph.node) == 8  # k and v of 4 layers
    r = run_check(tiny_artifacts_inplace, images=4)
    assert r["passed"], r["summary"]
    # the same tokens as the past/present graph, and one buffer per cache serves every pass
    p = Pipeline(tiny_artifacts_inplace)
    a = p.generate([1, 2], seed=3)
    b = Pipeline(tiny_artifacts).generate([1, 2], seed=3)
    assert np.array_equal(a.tokens, b.tokens)
    assert "kv.cache_key_0" in p.backend.buf and not any(k.startswith("kv.0.") for k in p.backend.buf)
    again = p.generate([1, 2], seed=3)  # stale slots from the previous image are masked
    assert np.array_equal(again.tokens, a.tokens)
    # the past/present fallback (for TensorRT < 10.15) shares weights.bin and draws the same tokens
    fb = m.kv_cache_view("concat")
    assert fb.kv_cache == "concat" and fb.opset == 20 and fb.graphs["generator"].file == "generator/generator.concat.onnx"
    size = lambda d: (d / "generator" / "weights.bin").stat().st_size  # noqa: E731
    assert size(tiny_artifacts_inplace) < 1.05 * size(tiny_artifacts)  # no second copy of the weights
    c = Pipeline(tiny_artifacts_inplace, manifest=fb)
    assert "kv.4.present_key_0" in c.backend.buf and "kv.cache_key_0" not in c.backend.buf
    assert np.array_equal(c.generate([1, 2], seed=3).tokens, a.tokens)
