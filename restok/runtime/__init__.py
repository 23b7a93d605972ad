"""The runtime: run an export (artifacts folder) without PyTorch.

``Pipeline(folder).generate(labels)`` runs the schedule's passes and the tokenizer decoder on a backend:
ONNX Runtime (the embedded default), TensorRT (GPU) or PyTorch (the reference; the only backend that
imports torch, and only when chosen).
"""

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import Backend, backend_names, create_backend
from restok.runtime.pipeline import Generation, Pipeline, SamplingParams

__all__ = ["ArtifactError", "Backend", "Generation", "Manifest", "Pipeline", "SamplingParams", "backend_names", "create_backend"]
