"""What the GPU backends share, whatever drives the device (PyTorch for ``cuda``, cuda-python for
``tensorrt``): batch buckets, the one host block of per-run inputs, and the bookkeeping of captured CUDA
graphs with its fallback. No torch, no CUDA here: this logic runs and is tested on a CPU.

- Buckets: a CUDA graph replays fixed shapes, so runs are padded to the smallest bucket that holds them
  (powers of two up to the export's max batch, and the max batch itself): at most log2(max batch) + 1
  graphs per configuration instead of one per batch size.
- Host block: every per-run host input (noise keys, settings, pass 0's labels) lives at an offset of one
  pinned block that crosses to the device in one copy. Offsets are multiples of 256 bytes: TensorRT's
  ``setTensorAddress`` requires 256-byte aligned addresses for its I/O tensors, and CUDA's allocator gives
  256-byte aligned blocks, so every input starts aligned.
- Graphs: captured lazily (or all at load) per key; a capture that fails is ended, its error cleared by the
  backend, the key marked eager (said once on stderr) and the run goes on without a graph, as trtexec does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from restok.runtime.plan import HOST_INPUT, BindingPlan

HOST_ALIGN = 256


def buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch``: 16 -> [1, 2, 4, 8, 16]; 12 -> [1, 2, 4, 8, 12]."""
    if max_batch < 1:
        raise ValueError(f"max batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(batch: int, max_batch: int) -> int:
    """The smallest bucket that holds ``batch`` images."""
    if not 1 <= batch <= max_batch:
        raise ValueError(f"a run takes 1..{max_batch} images (the export's --max-batch); got {batch}")
    return next(b for b in buckets(max_batch) if b >= batch)


def real_rows(batch: int, bucket: int, guided: bool, axis: str = "rows") -> np.ndarray:
    """Indices of the real images' rows in a tensor computed for ``bucket`` images: the first ``batch`` of
    an image axis; of a generator-row axis, the first ``batch`` conditional and (guided) the first ``batch``
    unconditional rows, which start at ``bucket``."""
    first = np.arange(batch)
    return np.concatenate([first, bucket + first]) if axis == "rows" and guided else first


def align(n: int, to: int = HOST_ALIGN) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class HostBlock:
    """Where each per-run host input lives in the one host block (and in its device mirror)."""

    offsets: dict[str, int]
    nbytes: int

    @classmethod
    def of(cls, plan: BindingPlan) -> "HostBlock":
        offsets, off = {}, 0
        for key, buf in plan.buffers.items():
            if buf.kind == HOST_INPUT:
                offsets[key] = off
                off += align(max(buf.nbytes, 1))
        return cls(offsets, max(off, HOST_ALIGN))


@dataclass
class GraphCache:
    """Captured graphs by key. ``get(key, capture)`` returns the graph, capturing it on first use; a key
    whose capture failed returns None from then on (the caller runs eagerly)."""

    what: str = "restok"
    graphs: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)  # key -> the error of its capture

    def get(self, key: Hashable, capture: Callable[[], object]):
        if key in self.graphs:
            return self.graphs[key]
        if key in self.failed:
            return None
        try:
            graph = capture()
        except Exception as e:  # the backend has already ended the capture and cleared the device's error
            self.failed[key] = f"{type(e).__name__}: {e}"
            print(f"{self.what}: warning: CUDA-graph capture failed for {key} ({self.failed[key]}); running "
                  "this configuration without a graph", file=sys.stderr)
            return None
        self.graphs[key] = graph
        return graph

    def clear(self) -> list:
        """Forget every graph; returns them so the caller can free them."""
        graphs = list(self.graphs.values())
        self.graphs.clear()
        return graphs
