"""Q/DQ placement (restok.calibration.qdq) as TensorRT accepts it: W8A8 on the linear layers, zero points 0,
per-channel weight and per-tensor activation scales, the LM head, the down projections and the attention
BMMs kept in FP32, nothing else quantized."""

import onnx
from onnx import numpy_helper

from restok.manifest import Manifest


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_placement_and_zero_points(int8_artifacts):
    m = Manifest.read(int8_artifacts)
    model = onnx.load(str(int8_artifacts / m.graphs["generator"].file))
    inits = {t.name: t for t in model.graph.initializer}
    prod = _producers(model)
    quantized, head, bmm = [], [], []
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        w = prod.get(n.input[1])
        if w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits:
            quantized.append(n)
            assert inits[w.input[0]].data_type == onnx.TensorProto.INT8
            act = prod.get(n.input[0])
            assert act is not None and act.op_type == "DequantizeLinear"  # W8A8: the activation is Q/DQ'd too
        elif n.input[1] in inits:
            head.append(tuple(inits[n.input[1]].dims))
        else:
            bmm.append(n)
    layers = 4
    assert len(quantized) == 4 * layers  # wqkv, wo, w1, w3 of every layer
    assert sorted(head) == [(128, 1024)] + [(512, 128)] * layers  # the LM head and the down projections stay FP32
    assert len(bmm) == 2 * layers  # the attention BMMs stay in FP32
    # symmetric: every zero point is 0; per-channel weight scales, per-tensor activation scales
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not numpy_helper.to_array(inits[n.input[2]]).any()
            scale = numpy_helper.to_array(inits[n.input[1]])
            assert scale.ndim == (1 if n.input[0] in inits else 0)
    # nothing else is quantized: no Q/DQ feeds norms, softmax, adds or the sampling head
    for n in model.graph.node:
        if n.op_type in ("Softmax", "ReduceMean", "Add", "Gather", "ArgMax"):
            assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in n.input), n.op_type
