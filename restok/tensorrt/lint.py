"""Check, without TensorRT, that a graph only uses what TensorRT's ONNX parser accepts.

The support facts come from the onnx-tensorrt operator matrix (docs/operators.md) at the commits that
TensorRT pins: 10.3 (62bdde2; bracketed by the 10.1-GA branch and the 10.6 file, identical for every
operator restok emits except Slice axes), 10.14 (c727277), 10.15 (fa5aa9f) and 11.1 (7c51a63): which
operators parse, with which tensor types, and the static restrictions (zero points of Q/DQ, constant
reduce axes, TopK's K below 3840 and sorted, 4-D TensorScatter on axis -2 over a float cache taken from a
network input and returned as a network output, 4-D Attention without past/present, Resize modes, ...).
``MIN_TENSORRT`` records operators that newer versions added; ``LintReport.min_tensorrt`` is what a graph
needs. Anything this lint cannot decide statically is not claimed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIN_OPSET, MAX_OPSET = 9, 24
TOPK_MAX_K = 3840

F, H, B16, I32, I64, BOOL, U8 = "float", "float16", "bfloat16", "int32", "int64", "bool", "uint8"
FLOATS = (F, H, B16)
NUMERIC = FLOATS + (I32, I64)
ANY = NUMERIC + (BOOL,)

# operator -> tensor types its data inputs may have (TensorRT 10.15 matrix); only operators we may emit
SUPPORTED: dict[str, tuple[str, ...]] = {
    "Abs": NUMERIC, "Add": NUMERIC, "And": (BOOL,), "ArgMax": NUMERIC, "ArgMin": NUMERIC,
    "Attention": FLOATS, "AveragePool": FLOATS, "Cast": ANY + (U8,), "CastLike": ANY + (U8,), "Clip": FLOATS,
    "Concat": ANY, "Constant": ANY, "ConstantOfShape": ANY, "Conv": FLOATS, "ConvTranspose": FLOATS, "Cos": FLOATS,
    "CumSum": FLOATS, "DequantizeLinear": ("int8", "float8e4m3fn", "int4", "float4e2m1"), "Div": NUMERIC,
    "Dropout": FLOATS, "Einsum": FLOATS, "Equal": NUMERIC, "Erf": FLOATS, "Exp": FLOATS, "Expand": ANY,
    "Flatten": ANY, "Floor": FLOATS, "Gather": ANY, "GatherElements": ANY, "GatherND": ANY, "Gelu": NUMERIC,
    "Gemm": FLOATS, "GlobalAveragePool": FLOATS, "Greater": NUMERIC, "GreaterOrEqual": NUMERIC,
    "GroupNormalization": FLOATS, "Identity": ANY, "InstanceNormalization": FLOATS, "IsInf": FLOATS,
    "IsNaN": NUMERIC, "LayerNormalization": FLOATS, "LeakyRelu": FLOATS, "Less": NUMERIC, "LessOrEqual": NUMERIC,
    "Log": FLOATS, "LogSoftmax": FLOATS, "MatMul": FLOATS, "Max": NUMERIC, "MaxPool": FLOATS, "Mean": NUMERIC,
    "Min": NUMERIC, "Mod": NUMERIC, "Mul": NUMERIC, "Neg": NUMERIC, "Not": (BOOL,), "Or": (BOOL,), "Pad": NUMERIC,
    "Pow": NUMERIC, "QuantizeLinear": FLOATS, "Range": NUMERIC, "Reciprocal": FLOATS, "ReduceL2": NUMERIC,
    "ReduceMax": NUMERIC, "ReduceMean": NUMERIC, "ReduceMin": NUMERIC, "ReduceProd": NUMERIC, "ReduceSum": NUMERIC,
    "ReduceSumSquare": NUMERIC, "Relu": NUMERIC, "Reshape": ANY, "Resize": FLOATS, "RMSNormalization": FLOATS,
    "RotaryEmbedding": FLOATS, "Round": FLOATS, "ScatterElements": NUMERIC, "ScatterND": NUMERIC, "Shape": ANY,
    "Sigmoid": FLOATS, "Sign": NUMERIC, "Sin": FLOATS, "Size": ANY, "Slice": ANY, "Softmax": FLOATS, "Split": ANY,
    "Sqrt": FLOATS, "Squeeze": ANY, "Sub": NUMERIC, "Sum": NUMERIC, "Tanh": FLOATS,
    # the matrix also lists INT32, but the KV-cache update layer it maps to takes float/half/bf16 caches only
    "TensorScatter": FLOATS, "Tile": ANY, "TopK": NUMERIC, "Transpose": ANY, "Trilu": ANY,
    "Unsqueeze": ANY, "Where": ANY, "Xor": (BOOL,),
}
UNSUPPORTED = {"BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Bernoulli", "Col2Im", "Compress",
               "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "MatMulInteger",
               "MaxRoiPool", "MaxUnpool", "Multinomial", "Optional", "QLinearConv", "QLinearMatMul", "Unique",
               "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
               "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer"}
# the ones that make CUDA-graph capture or static engines fragile (DESIGN: avoid)
DISCOURAGED = {"If", "Loop", "Scan", "NonZero", "RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"}
# operators the 10.3 parser does not have (first version that parses them); CumSum parses from 10.3 but as a
# sequential loop over the axis until 10.8 (ICumulativeLayer), which is why restok's sampler avoids it
MIN_TENSORRT = {"Attention": (10, 14), "TensorScatter": (10, 15), "RotaryEmbedding": (10, 15)}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}

_ELEM = {1: F, 10: H, 16: B16, 6: I32, 7: I64, 9: BOOL, 2: U8, 3: "int8", 11: "double", 17: "float8e4m3fn",
         22: "int4", 23: "float4e2m1"}


@dataclass
class LintReport:
    path: str
    opset: int
    ops: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def min_tensorrt(self) -> tuple[int, int]:
        """The oldest TensorRT whose parser takes every operator of the graph (restok builds from 10.3)."""
        return max([(10, 3)] + [MIN_TENSORRT[op] for op in self.ops if op in MIN_TENSORRT])

    @property
    def ok(self) -> bool:
        return not self.errors


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def lint_model(model, path: str = "<model>", base_dir: str = "") -> LintReport:
    """``base_dir``: where the model's external data lives (to read constant zero points and K values)."""
    import onnx
    from onnx import numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    rep = LintReport(path, opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        rep.errors.append(f"opset {opset} is outside the range TensorRT parses ({MIN_OPSET}..{MAX_OPSET})")
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            rep.errors.append(f"custom domain {o.domain!r}: only TensorRT plugins could run it")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {}
    ranks = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[v.name] = _ELEM.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
        if v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    inits = {}
    for t in model.graph.initializer:
        types[t.name] = _ELEM.get(t.data_type, str(t.data_type))
        inits[t.name] = t
    consts = set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    graph_inputs = {v.name for v in model.graph.input}
    graph_outputs = {v.name for v in model.graph.output}
    for v in list(inferred.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if types.get(v.name) == "double":
            rep.errors.append(f"tensor {v.name} is float64: TensorRT casts DOUBLE down (precision loss); export in float32")

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name], base_dir)
        for n in model.graph.node:
            if n.op_type == "Constant" and n.output[0] == name:
                return numpy_helper.to_array(_attr(n, "value"))
        return None

    for node in model.graph.node:
        op = node.op_type
        rep.ops[op] = rep.ops.get(op, 0) + 1
        where = f"{op} node {node.name or node.output[0]}"
        if node.domain not in ("", "ai.onnx"):
            rep.errors.append(f"{where}: custom domain {node.domain!r}")
            continue
        if op in UNSUPPORTED or op not in SUPPORTED and op not in DISCOURAGED:
            rep.errors.append(f"{where}: not supported by TensorRT's ONNX parser")
            continue
        if op in DISCOURAGED:
            rep.warnings.append(f"{where}: parses, but control flow / randomness / data-dependent shapes break static engines and CUDA graphs")
            continue
        first = node.input[0] if node.input else ""
        t = types.get(first)
        if t and op not in ("Shape", "Size") and t not in SUPPORTED[op]:
            rep.errors.append(f"{where}: input type {t} is not supported (TensorRT takes {', '.join(SUPPORTED[op])})")
        if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            z = value(node.input[2])
            if z is None or z.astype("float32").any():
                rep.errors.append(f"{where}: zero point must be a constant 0 (symmetric quantization)")
        if op.startswith("Reduce") and len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
            rep.errors.append(f"{where}: axes must be an initializer")
        if op in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] not in consts:
            rep.errors.append(f"{where}: axes must be a constant")
        if op == "TopK":
            k = value(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                rep.errors.append(f"{where}: K must be a build-time constant")
            elif int(k.reshape(-1)[0]) >= TOPK_MAX_K:
                rep.errors.append(f"{where}: K={int(k.reshape(-1)[0])} must be below {TOPK_MAX_K}")
            if _attr(node, "sorted", 1) != 1:
                rep.errors.append(f"{where}: sorted must be 1")
        if op == "TensorScatter":
            if _attr(node, "axis", -2) != -2:
                rep.errors.append(f"{where}: axis must be -2")
            if any(ranks.get(i, 4) != 4 for i in node.input[:2]):
                rep.errors.append(f"{where}: past_cache and update must be 4-D")
            if node.input[0] not in graph_inputs:
                rep.errors.append(f"{where}: the cache must be a network input (TensorRT's KV-cache update is in place)")
            if node.output[0] not in graph_outputs:
                rep.errors.append(f"{where}: the updated cache must be a network output")
            mode = _attr(node, "mode", b"linear")
            if (mode.decode() if isinstance(mode, bytes) else mode) != "linear":
                rep.errors.append(f"{where}: only mode 'linear' is supported")
        if op == "Attention":
            bad = [i for i in node.input[:4] if i and ranks.get(i, 4) != 4]
            if bad:
                rep.errors.append(f"{where}: Q, K, V and attn_mask must be 4-D ({', '.join(bad)} are not)")
        if op == "Attention" and len(node.input) > 4 and any(node.input[4:]):
            rep.errors.append(f"{where}: past_key/past_value/nonpad_kv_seqlen inputs are not supported")
        if op == "Attention" and len(node.output) > 1 and any(node.output[1:]):
            rep.errors.append(f"{where}: present_* and qk_matmul_output outputs are not supported")
        if op == "Resize":
            mode = _attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            coord = _attr(node, "coordinate_transformation_mode", b"half_pixel")
            coord = coord.decode() if isinstance(coord, bytes) else coord
            near = _attr(node, "nearest_mode", b"round_prefer_floor")
            near = near.decode() if isinstance(near, bytes) else near
            if mode not in RESIZE_MODES or coord not in RESIZE_COORD or (mode == "nearest" and near not in RESIZE_NEAREST):
                rep.errors.append(f"{where}: Resize mode {mode}/{coord}/{near} is not supported")
            if _attr(node, "antialias", 0):
                rep.errors.append(f"{where}: antialiased Resize is not supported")
        if op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            rep.errors.append(f"{where}: ScatterND reduction must be none")
        if op in ("AveragePool", "MaxPool") and len(_attr(node, "kernel_shape", [])) not in (2, 3):
            rep.errors.append(f"{where}: only 2D or 3D pooling")
        if op == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            rep.errors.append(f"{where}: only the first output is supported")
    return rep


def lint_file(path: str | Path) -> LintReport:
    import onnx

    return lint_model(onnx.load(str(path), load_external_data=False), str(path), str(Path(path).parent))


def lint_artifacts(folder: str | Path) -> dict[str, LintReport]:
    from restok.manifest import Manifest

    folder = Path(folder)
    m = Manifest.read(folder, verify=False)
    reports = {name: lint_file(folder / g.file) for name, g in m.graphs.items()}
    if m.fallback:  # the past/present generator for TensorRT < 10.15
        reports[f"generator.{m.fallback['kv_cache']}"] = lint_file(folder / m.fallback["generator"]["file"])
    return reports


def tensorrt_summary(folder: str | Path, graphs: tuple[str, ...] | None = None) -> dict:
    """What ``restok export``, ``calibrate``, ``check`` and ``build`` report about an export: whether
    TensorRT's parser takes every graph (``graphs``: these only) and from which version, with the first
    problems of each graph that it would reject. ``{"linted": False, ...}`` where onnx is not installed."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return {"linted": False, "note": "onnx is not installed: the TensorRT lint did not run"}
    reports = {k: r for k, r in lint_artifacts(folder).items() if graphs is None or k.split(".")[0] in graphs}
    parses = [r for k, r in reports.items() if r.ok]
    return {"linted": True, "parses": len(parses) == len(reports),
            "min_tensorrt": ".".join(map(str, max((r.min_tensorrt for r in parses), default=(10, 3)))),
            "graphs": {k: {"ok": r.ok, "min_tensorrt": ".".join(map(str, r.min_tensorrt)), "errors": r.errors[:5]}
                       for k, r in reports.items()}}


def tensorrt_line(summary: dict) -> str:
    """One line for a command's output."""
    if not summary.get("linted"):
        return f"TensorRT: {summary.get('note', 'not checked')}"
    if summary["parses"]:
        return f"TensorRT: every graph parses (TensorRT >= {summary['min_tensorrt']})"
    bad = {k: v["errors"][0] for k, v in summary["graphs"].items() if not v["ok"]}
    return "TensorRT would reject " + "; ".join(f"{k}: {e}" for k, e in bad.items())
