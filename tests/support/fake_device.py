"""A simulated device for testing restok's TensorRT backend logic on a CPU: NOT a test of TensorRT.

``FakeCudart`` implements the cuda-python runtime calls the backend makes over host memory: device
pointers are addresses of host buffers, copies are memmoves, and stream capture records the operations
instead of running them, as CUDA does (a graph launch replays them). ``fake_tensorrt`` is a module with the
TensorRT Python API surface the backend uses, whose engines run the export's ONNX graph with ONNX Runtime on
whatever addresses and shapes the backend bound, checking each shape against the engine's profiles.

What this verifies: restok's bookkeeping — buffers, bindings per profile and batch size, the device
copies that chain passes and gather tokens, capture/replay, in-place cache aliasing, dropped inputs, and
that every allocation is freed. What it cannot verify: anything TensorRT itself does (parsing, kernels,
numerics, its real API behaviour); scripts/gpu_check.sh does that on a GPU.

Documented rules it enforces (a breach fails loudly here where a real GPU would give wrong results or an
error much later):
- a CUDA graph captured with an execution context is valid only while that context keeps the input shapes
  it had at capture (TensorRT developer guide, CUDA graphs; NVIDIA in TensorRT issue 3798: "use one
  execution context per captured graph"): replaying it after ``set_input_shape`` changed that context
  fails the launch with cudaErrorIllegalState;
- ``setTensorAddress`` takes 256-byte aligned addresses only (it returns false otherwise); cudaMalloc's
  addresses are 256-byte aligned, as CUDA's are;
- with ``fail_in_capture``, an enqueue during stream capture fails (an operation the capture cannot take):
  the capture is invalidated (cudaStreamEndCapture returns cudaErrorStreamCaptureInvalidated) and the
  error stays: every later runtime call returns it until ``cudaGetLastError`` reads and clears it;
- ``cudaGetDeviceProperties`` reports the GPU given (name, compute capability: an sm_80 A100 has no FP8).
"""

from __future__ import annotations

import ctypes
import types
from enum import IntEnum

import numpy as np

SUCCESS = 0


class _Err(IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorIllegalState = 401


ALIGN = 256  # cudaMalloc's alignment, and what setTensorAddress requires
STICKY_EXEMPT = {"cudaGetLastError", "cudaGetErrorName", "cudaStreamEndCapture"}


class FakeCudart:
    """The subset of cuda.bindings.runtime restok calls; every call returns (err, ...) like cuda-python."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                           cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, fail_malloc_after: int | None = None, fail_in_capture: bool = False,
                 gpu: tuple[str, int, int] = ("Simulated H200", 9, 0)):
        self.buffers: dict[int, ctypes.Array] = {}
        self.pinned: set[int] = set()
        self.capturing: list | None = None
        self.capture_broken = False
        self.mallocs = 0
        self.fail_malloc_after = fail_malloc_after
        self.fail_in_capture = fail_in_capture
        self.gpu = gpu
        self.last_error = _Err.cudaSuccess  # sticky until cudaGetLastError
        self.launches = 0

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name.startswith("cuda") and callable(attr) and name not in STICKY_EXEMPT:
            err = object.__getattribute__(self, "last_error")
            if err != _Err.cudaSuccess:
                return lambda *a, **k: (err,)  # a pending error fails every call until it is read
        return attr

    # memory
    def _alloc(self, n: int) -> int:
        if self.fail_malloc_after is not None and self.mallocs >= self.fail_malloc_after:
            return None
        self.mallocs += 1
        buf = (ctypes.c_byte * (max(int(n), 1) + ALIGN))()
        ptr = -(-ctypes.addressof(buf) // ALIGN) * ALIGN
        self.buffers[ptr] = buf
        return ptr

    def cudaMalloc(self, n):
        ptr = self._alloc(n)
        return (_Err.cudaErrorMemoryAllocation, None) if ptr is None else (_Err.cudaSuccess, ptr)

    def cudaMallocHost(self, n):
        err, ptr = self.cudaMalloc(n)
        if ptr is not None:
            self.pinned.add(ptr)
        return err, ptr

    def cudaFree(self, ptr):
        if int(ptr) not in self.buffers or int(ptr) in self.pinned:
            return (_Err.cudaErrorInvalidValue,)
        del self.buffers[int(ptr)]
        return (_Err.cudaSuccess,)

    def cudaFreeHost(self, ptr):
        if int(ptr) not in self.pinned:
            return (_Err.cudaErrorInvalidValue,)
        self.pinned.discard(int(ptr))
        del self.buffers[int(ptr)]
        return (_Err.cudaSuccess,)

    def _op(self, fn):
        if self.capturing is not None:
            self.capturing.append(fn)
        else:
            fn()
        return (_Err.cudaSuccess,)

    def cudaMemsetAsync(self, ptr, value, n, stream):
        return self._op(lambda: ctypes.memset(int(ptr), value, n))

    def cudaMemcpy(self, dst, src, n, kind):
        ctypes.memmove(int(dst), int(src), n)
        return (_Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        return self._op(lambda: ctypes.memmove(int(dst), int(src), n))

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        def run():
            for r in range(height):
                ctypes.memmove(int(dst) + r * dpitch, int(src) + r * spitch, width)
        return self._op(run)

    # streams and graphs
    def cudaStreamCreate(self):
        return _Err.cudaSuccess, 7

    def cudaStreamSynchronize(self, stream):
        return (_Err.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        return (_Err.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        self.capture_broken = False
        return (_Err.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capturing = self.capturing, None
        if self.capture_broken:
            return _Err.cudaErrorStreamCaptureInvalidated, None
        return _Err.cudaSuccess, ops

    def fail_capture(self) -> None:
        """What an operation that cannot be captured does: the capture is void and the error pending."""
        self.capture_broken = True
        self.last_error = _Err.cudaErrorStreamCaptureUnsupported

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, _Err.cudaSuccess
        return (err,)

    def cudaGetDeviceProperties(self, device):
        name, major, minor = self.gpu
        return _Err.cudaSuccess, types.SimpleNamespace(name=name.encode(), major=major, minor=minor)

    def cudaGraphInstantiate(self, graph, flags):
        return _Err.cudaSuccess, list(graph)

    def cudaGraphLaunch(self, exec_, stream):
        self.launches += 1
        for op in exec_:
            if op() is False:  # a kernel captured with a context whose shapes have changed since
                return (_Err.cudaErrorIllegalState,)
        return (_Err.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        return (_Err.cudaSuccess,)

    def cudaGraphExecDestroy(self, exec_):
        return (_Err.cudaSuccess,)

    def cudaGetErrorName(self, err):
        return _Err.cudaSuccess, _Err(int(err)).name.encode()

    @property
    def live(self) -> int:
        return len(self.buffers)


# ------------------------------------------------------------------------------------ TensorRT

class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 8
    BOOL = 4


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64,
       DataType.BOOL: np.bool_}
_FROM_NP = {np.dtype(v): k for k, v in _NP.items()}


class FakeEngine:
    def __init__(self, module, spec: dict):
        import onnxruntime as ort

        self.module = module
        self.sess = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.profiles = spec["profiles"]  # [{input: [min, opt, max]}]
        self.dropped = set(spec.get("dropped", ()))
        self.names = [i.name for i in self.sess.get_inputs() if i.name not in self.dropped] + \
                     [o.name for o in self.sess.get_outputs()]
        self.types = {v.name: v for v in [*self.sess.get_inputs(), *self.sess.get_outputs()]}
        self.aliases = spec.get("aliases", {})
        self.contexts = 0

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        t = self.types[name].type
        return {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int32)": DataType.INT32,
                "tensor(int64)": DataType.INT64, "tensor(bool)": DataType.BOOL}[t]

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.types[name].shape)

    @property
    def num_optimization_profiles(self):
        return len(self.profiles)

    device_memory_size_v2 = 1 << 16

    def get_aliased_input_tensor(self, name):
        return self.aliases.get(name)

    def create_execution_context(self, strategy):
        self.contexts += 1
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory = None
        self.shape_version = 0  # bumped whenever an input shape changes

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, i, stream):
        if self.shapes:
            raise RuntimeError("set_optimization_profile_async must come before set_input_shape")
        self.profile = i

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        if self.shapes.get(name) != tuple(shape):
            self.shape_version += 1
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.names or int(ptr) % ALIGN:
            return False
        self.addresses[name] = int(ptr)
        return True

    def infer_shapes(self):
        return [n for n in self.engine.names[: len(self.engine.names) - len(self.engine.sess.get_outputs())]
                if n not in self.shapes]

    def _array(self, name, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = (ctypes.c_byte * max(n, 1)).from_address(self.addresses[name])
        return np.frombuffer(buf, dtype=np.uint8, count=n).view(dtype).reshape(shape)

    def execute_async_v3(self, stream):
        cu = self.engine.module.cudart
        if cu.last_error != _Err.cudaSuccess:
            return False
        if cu.capturing is not None:
            if cu.fail_in_capture:
                cu.fail_capture()
                return False
            version, addresses = self.shape_version, dict(self.addresses)

            def replay():  # valid only while this context keeps the shapes it had at capture
                if self.shape_version != version or self.addresses != addresses:
                    return False
                self._run()
            cu.capturing.append(replay)
        else:
            self._run()
        return True

    def _run(self):
        e = self.engine
        feeds = {}
        for i in e.sess.get_inputs():
            if i.name in e.dropped:  # a per-image input TensorRT dropped: the test makes its value irrelevant
                feeds[i.name] = np.ones(self.shapes["noise_keys"][:1], dtype=_NP[e.get_tensor_dtype(i.name)])
                continue
            feeds[i.name] = np.array(self._array(i.name, self.shapes[i.name], _NP[e.get_tensor_dtype(i.name)]))
        outs = e.sess.run(None, feeds)
        for o, val in zip(e.sess.get_outputs(), outs):
            self._array(o.name, val.shape, val.dtype)[...] = val


def fake_tensorrt(cudart: FakeCudart, version: str = "10.15.1") -> types.ModuleType:
    """A module object standing in for ``tensorrt``; plans are JSON specs that name an ONNX file."""
    import json

    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.cudart = cudart
    m.DataType = DataType
    m.nptype = lambda dt: _NP[DataType(dt)]

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            return FakeEngine(m, json.loads(plan))

    m.Logger, m.Runtime = Logger, Runtime
    m.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED=2)
    return m
