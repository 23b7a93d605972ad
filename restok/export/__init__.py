"""PyTorch -> ONNX: one generator graph per HAR step (sampling inside), tokenizer decoder and encoder graphs,
and the manifest that describes them."""

from restok.export.exporter import DEFAULT_OPSET, ExportOptions, export_artifacts, state_dict_sha256
from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorStepGraph

__all__ = [
    "DEFAULT_OPSET",
    "DecoderGraph",
    "EncoderGraph",
    "ExportOptions",
    "GeneratorStepGraph",
    "export_artifacts",
    "state_dict_sha256",
]
