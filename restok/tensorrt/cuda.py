"""CUDA through cuda-python for the TensorRT side: the one place that imports it, checks its calls, owns
device and pinned memory, streams and graph capture, and says which GPU this is. No torch.

Facts it relies on (cuda-python 12.6-12.9 and 13.x; CUDA runtime documentation):
- every runtime call returns ``(err, *results)``; ``cudaGetErrorName(err)`` names the error;
- a failed operation during stream capture invalidates the capture: ``cudaStreamEndCapture`` then returns
  an error (and maybe no graph), the stream leaves capture mode, and the error is reported again by the next
  call unless ``cudaGetLastError`` is called, which returns and clears it (trtexec clears it so and runs
  without a graph);
- ``cudaGraphInstantiate(graph, flags)`` returns ``(err, graph_exec)``.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np


class CudaError(RuntimeError):
    """A CUDA or TensorRT runtime call failed on the device."""


def cudart():
    """cuda-python's runtime module (the 12.6+ layout, else the older one)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6 layout
        except ImportError as e:
            raise ImportError("cuda-python is not installed: pip install 'cuda-python>=12.6,<13'") from e
    return rt


def gpu_identity(rt=None) -> dict:
    """{'name', 'compute_capability'} of device 0."""
    rt = rt or cudart()
    err, props = rt.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise CudaError(f"no usable CUDA device (cudaGetDeviceProperties: {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00").strip(), "compute_capability": f"{props.major}.{props.minor}"}


def compute_capability(gpu: dict) -> tuple[int, int]:
    major, minor = (int(x) for x in str(gpu["compute_capability"]).split(".")[:2])
    return major, minor


class Cuda:
    """Checked runtime calls, and every allocation made through them (freed by ``free_all``)."""

    def __init__(self, rt=None):
        self.rt = rt or cudart()
        self.device_ptrs: list[int] = []
        self.pinned_ptrs: list[int] = []

    def __call__(self, fn: str, *args):
        res = getattr(self.rt, fn)(*args)
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if int(err) != 0:
            name = self.error_name(err)
            if "MemoryAllocation" in name:
                raise MemoryError(f"the GPU ran out of memory in {fn}; use a smaller --max-batch, fp16/int8 engines, "
                                  "or free the device") from None
            raise CudaError(f"{fn} failed: {name}")
        return rest[0] if len(rest) == 1 else rest

    def error_name(self, err) -> str:
        name = self.rt.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)

    def kind(self, name: str):
        return getattr(self.rt.cudaMemcpyKind, name)

    # ------------------------------------------------------------------ memory
    def malloc(self, nbytes: int, stream=None) -> int:
        """Device memory, zeroed when ``stream`` is given (a non-null address even for 0 bytes)."""
        ptr = int(self("cudaMalloc", max(int(nbytes), 1)))
        self.device_ptrs.append(ptr)
        if stream is not None:
            self("cudaMemsetAsync", ptr, 0, max(int(nbytes), 1), stream)
        return ptr

    def pinned(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Page-locked host memory and a uint8 numpy view of it."""
        ptr = int(self("cudaMallocHost", max(int(nbytes), 1)))
        self.pinned_ptrs.append(ptr)
        view = np.frombuffer((ctypes.c_byte * max(int(nbytes), 1)).from_address(ptr), dtype=np.uint8)
        return ptr, view

    def free_all(self) -> None:
        for ptr in self.device_ptrs:
            self("cudaFree", ptr)
        for ptr in self.pinned_ptrs:
            self("cudaFreeHost", ptr)
        self.device_ptrs, self.pinned_ptrs = [], []

    # ------------------------------------------------------------------ copies
    def to_device(self, dst: int, src: int, nbytes: int, stream) -> None:
        self("cudaMemcpyAsync", dst, src, nbytes, self.kind("cudaMemcpyHostToDevice"), stream)

    def to_host(self, dst: int, src: int, nbytes: int, stream) -> None:
        self("cudaMemcpyAsync", dst, src, nbytes, self.kind("cudaMemcpyDeviceToHost"), stream)

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream) -> None:
        self("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, self.kind("cudaMemcpyDeviceToDevice"),
             stream)

    # ------------------------------------------------------------------ graphs
    def capture(self, stream, enqueue: Callable[[], None]):
        """Capture what ``enqueue`` puts on ``stream`` into an instantiated graph. On any failure the capture
        is ended, a partial graph destroyed, the device's last error cleared and the error raised: the
        stream is usable again and the caller may run without a graph."""
        rt = self.rt
        self("cudaStreamBeginCapture", stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            enqueue()
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(stream)  # unchecked: the capture is void, report the cause
            if int(err) == 0 and graph is not None:
                rt.cudaGraphDestroy(graph)
            rt.cudaGetLastError()  # clear the error the failed operation left
            raise
        res = rt.cudaStreamEndCapture(stream)
        err, graph = res[0], (res[1] if len(res) > 1 else None)
        if int(err) != 0 or graph is None:
            rt.cudaGetLastError()
            raise CudaError(f"cudaStreamEndCapture failed: {self.error_name(err)} (an operation of the run cannot "
                            "be captured)")
        try:
            return self("cudaGraphInstantiate", graph, 0)
        except CudaError:
            rt.cudaGetLastError()
            raise
        finally:
            self("cudaGraphDestroy", graph)

    def launch(self, graph_exec, stream) -> None:
        self("cudaGraphLaunch", graph_exec, stream)

    def destroy(self, graph_exec) -> None:
        self("cudaGraphExecDestroy", graph_exec)
