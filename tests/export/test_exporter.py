"""The exporter (restok.export.exporter): fp16 graphs keep norms and softmax in float32 and stay within what
fp16 measures against the fp32 reference."""

import onnx

from restok.manifest import Manifest
from restok.measure.parity import run_check


def test_fp16_graphs(tiny_artifacts_fp16):
    m = Manifest.read(tiny_artifacts_fp16)
    g = m.graphs["generator"]
    assert g.input("past_key_0").dtype == "float16" and g.output("logits").dtype == "float32"
    # norms and softmax stay in float32
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_artifacts_fp16 / g.file), load_external_data=False))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    ops = [n for n in model.graph.node if n.op_type in ("Softmax", "ReduceMean", "LayerNormalization")]
    assert ops and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in ops)
    r = run_check(tiny_artifacts_fp16, images=32)
    assert r["passed"]  # fp16 is reported, not gated, by default
    # what fp16 really achieves on this model (measured: 99.6% of tokens over 64 images, 53.7 dB): bound it
    # close to that (one image that diverges early costs 3% of the tokens of 32)
    assert r["generation"]["token_agreement"] >= 0.96, r["summary"]
    assert r["decoder"]["psnr_db"] >= 50, r["summary"]
