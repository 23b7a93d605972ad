"""PyTorch -> ONNX: one generator graph for every HAR pass and batch size (sampling inside), the tokenizer
decoder and encoder graphs, and the manifest that describes them."""

from restok.export.exporter import DEFAULT_OPSET, ExportOptions, export_artifacts, state_dict_sha256
from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorGraph

__all__ = [
    "DEFAULT_OPSET",
    "DecoderGraph",
    "EncoderGraph",
    "ExportOptions",
    "GeneratorGraph",
    "export_artifacts",
    "state_dict_sha256",
]
