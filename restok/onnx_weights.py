"""One external-data weights file per model, shared by the graphs of an export. No torch (calibration
writes its quantized graphs with it too)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from restok.manifest import ONNX_DTYPES

ALIGN = 4096  # external-data offsets, so the weights file can be memory-mapped
MIN_EXTERNAL_BYTES = 1024


class WeightsFile:
    """Appends initializers to one external-data file, once per distinct content."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}
        self.index: dict[str, dict] = {}  # name -> offset, shape, dtype (for runtimes that share weights)

    def close(self) -> None:
        self.f.close()

    def externalize(self, model, location: str) -> None:
        """Move every large initializer of ``model`` (an onnx ModelProto, data loaded) into the file and
        give it a content-derived name, so identical tensors in different graphs share storage and name."""
        from onnx import TensorProto

        renames = {}
        for init in model.graph.initializer:
            raw = init.raw_data
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            key = hashlib.sha256(f"{init.data_type}|{tuple(init.dims)}|".encode() + raw).hexdigest()
            if key not in self.offsets:
                pos = self.f.tell()
                pad = (-pos) % ALIGN
                self.f.write(b"\0" * pad)
                self.offsets[key] = (pos + pad, len(raw))
                self.f.write(raw)
            off, length = self.offsets[key]
            new_name = f"w_{key[:24]}"
            self.index[new_name] = {"offset": off, "shape": [int(d) for d in init.dims],
                                    "dtype": ONNX_DTYPES.get(init.data_type, str(init.data_type))}
            renames[init.name] = new_name
            init.name = new_name
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", location), ("offset", str(off)), ("length", str(length))):
                e = init.external_data.add()
                e.key, e.value = k, v
        # an initializer may be used twice in one graph: keep one copy
        seen, keep = set(), []
        for init in model.graph.initializer:
            if init.name not in seen:
                seen.add(init.name)
                keep.append(init)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        for vi in model.graph.value_info:
            if vi.name in renames:
                vi.name = renames[vi.name]
