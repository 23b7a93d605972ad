"""TensorRT engines from an export: one engine per graph, cached under the export and keyed by what they
depend on (the ONNX files' sha256, precision, batch, TensorRT version, GPU).

Why one engine per HAR step: the exported step graphs are static (new positions and cached length are
constants), so each engine gets kernels tuned for its exact shapes and needs no optimization-profile
switching, and the nine engines plus the decoder are trivially captured into one CUDA graph. The price is
that weights are stored once per step: 9 x 0.65 GB for GPT-L in fp16, which fits an H200 easily. (One
engine with nine profiles would store the weights once but needs a dynamic-shape graph; not measured yet.)

Precision comes from the graphs (TensorRT 11 networks are strongly typed; on 10.x we ask for strong
typing): fp32/fp16 exports, or int8/fp8 Q/DQ artifacts from ``restok calibrate``. TensorRT is imported
only here and in the TensorRT backend.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from restok.fileutil import atomic_path, atomic_write_bytes
from restok.manifest import Manifest

BUILD_INFO = "build.json"


class EngineError(RuntimeError):
    """Engines are missing, stale or cannot be built; the message says what to do."""


@dataclass
class BuildOptions:
    workspace_gb: float = 8.0
    opt_level: int = 3
    timing_cache: str = ""  # default: <engines root>/timing.cache, shared by every build of this export

    def validate(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"--opt-level must be in 0..5, got {self.opt_level}")
        if self.workspace_gb <= 0:
            raise ValueError(f"--workspace must be > 0 GB, got {self.workspace_gb}")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(
            "TensorRT is not installed here (import tensorrt failed). On a machine with an NVIDIA GPU: "
            "pip install 'restok[tensorrt]' (tensorrt and cuda-python from NVIDIA's index)"
        ) from e
    return trt


def gpu_identity() -> dict:
    """{'name', 'compute_capability'} of device 0 through the CUDA runtime (cuda-python)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as e:
            raise EngineError("cuda-python is not installed: pip install cuda-python") from e
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise EngineError(f"no usable CUDA device (cudaGetDeviceProperties: {err})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.strip("\x00").strip(), "compute_capability": f"{props.major}.{props.minor}"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def engine_dir(folder: Path, trt_version: str, gpu: dict) -> Path:
    return Path(folder) / "engines" / _slug(f"trt{trt_version}") / _slug(f"{gpu['name']}_sm{gpu['compute_capability']}")


def build_key(m: Manifest, trt_version: str, gpu: dict) -> dict:
    """Everything an engine depends on; stored in build.json and compared before any engine is used."""
    return {
        "onnx_sha256": {name: m.files[g.file]["sha256"] for name, g in sorted(m.graphs.items())},
        "weights_sha256": {k: m.files[k]["sha256"] for k in sorted(m.weights)},
        "precision": m.precision, "batch": m.batch, "guided": m.guided, "kv_cache": m.kv_cache,
        "tensorrt": trt_version, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
    }


def check_engines(folder: Path, m: Manifest, trt_version: str, gpu: dict) -> Path:
    """The engine folder for this TensorRT and GPU, after refusing anything stale, with the reason."""
    d = engine_dir(folder, trt_version, gpu)
    info = d / BUILD_INFO
    if not info.is_file():
        raise EngineError(f"no engines for TensorRT {trt_version} on {gpu['name']} in {d.parent.parent}; "
                          f"run: restok build --artifacts {folder}")
    have = json.loads(info.read_text()).get("key", {})
    want = build_key(m, trt_version, gpu)
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise EngineError(f"engines in {d} were built for a different {', '.join(diff)}; "
                          f"rebuild them: restok build --artifacts {folder}")
    for name in m.graphs:
        if not (d / f"{name}.plan").is_file():
            raise EngineError(f"{d / (name + '.plan')} is missing; rebuild: restok build --artifacts {folder}")
    return d


def tensorrt_manifest(m: Manifest, trt_version: str) -> Manifest:
    """The graphs this TensorRT builds: the export itself, or for an in-place KV-cache export on TensorRT
    < 10.15 its past/present fallback set (with a warning naming the version). Anything this TensorRT
    cannot parse is refused, saying which export works instead."""
    if m.precision == "int8-dynamic":
        raise EngineError("int8-dynamic artifacts use ONNX Runtime's DynamicQuantizeMatMul, which TensorRT cannot parse; "
                          "for TensorRT make Q/DQ artifacts with restok calibrate --precision int8 (or fp8)")
    v = _version_tuple(trt_version)
    if v < (10, 3):  # user-managed context memory (set_device_memory with a size) arrived in 10.1; we test from 10.3
        raise EngineError(f"TensorRT {trt_version} is too old: restok builds with TensorRT >= 10.3 (10.x or 11.x)")
    if m.kv_cache == "inplace" and v < (10, 15):
        if m.fallback.get("kv_cache") != "concat":
            raise EngineError(
                f"TensorRT {trt_version} cannot parse the in-place KV cache (ONNX TensorScatter needs TensorRT >= 10.15) "
                "and these artifacts carry no past/present fallback graphs; re-export with --kv-cache concat")
        msg = (f"TensorRT {trt_version} has no in-place KV-cache update (needs >= 10.15): using the past/present "
               "step graphs of this export instead (the KV cache is copied between passes)")
        warnings.warn(msg, stacklevel=2)
        print(f"restok: warning: {msg}", file=sys.stderr)
        m = m.kv_cache_view("concat")
    if m.opset > 24 or (m.opset > 20 and v < (10, 12)):
        raise EngineError(f"TensorRT {trt_version} may not parse opset {m.opset}; re-export with --opset 20")
    return m


def step_profiles(m: Manifest) -> dict[str, dict[str, tuple]]:
    """min = opt = max shapes of every input of every graph (static engines: one exact shape each)."""
    return {name: {t.name: (t.shape, t.shape, t.shape) for t in g.inputs} for name, g in m.graphs.items()}


class _Progress:
    """A TensorRT IProgressMonitor printing phases to stderr (created only when tensorrt is importable)."""

    @staticmethod
    def make(trt, label: str):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.last = ""

            def phase_start(self, phase_name, parent_phase, num_steps):  # TensorRT's argument order
                if parent_phase is None:
                    print(f"  {label}: {phase_name}", file=sys.stderr)

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                pass

        return Monitor()


def build_engines(folder: str | Path, options: BuildOptions | None = None) -> Path:
    """Build (or reuse) every engine of an export for this TensorRT and GPU. Returns the engine folder."""
    opts = options or BuildOptions()
    opts.validate()
    folder = Path(folder)
    m = Manifest.read(folder)
    trt = import_tensorrt()
    m = tensorrt_manifest(m, trt.__version__)
    gpu = gpu_identity()
    try:
        return check_engines(folder, m, trt.__version__, gpu)
    except EngineError:
        pass  # build below
    d = engine_dir(folder, trt.__version__, gpu)
    d.mkdir(parents=True, exist_ok=True)
    (d / BUILD_INFO).unlink(missing_ok=True)  # engines without a matching build.json are never used
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # a timing cache is only valid for one GPU, CUDA and TensorRT version: keep it with the engines
    tc_path = Path(opts.timing_cache) if opts.timing_cache else d / "timing.cache"
    major = int(trt.__version__.split(".")[0])
    layers = {}
    for name, g in m.graphs.items():
        flags = 0
        if major < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(folder / g.file)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {g.file}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
        config.builder_optimization_level = opts.opt_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if hasattr(config, "progress_monitor"):
            config.progress_monitor = _Progress.make(trt, name)
        cache = config.create_timing_cache(tc_path.read_bytes() if tc_path.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            print(f"restok build: {tc_path} does not fit this TensorRT/GPU; starting a new timing cache", file=sys.stderr)
            if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
                raise EngineError("TensorRT refused an empty timing cache")
        print(f"restok build: {name} ({g.file})", file=sys.stderr)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build {name}; see the messages above (out of memory? "
                              "try --workspace with less, or --opt-level 2)")
        with atomic_path(d / f"{name}.plan") as tmp:
            tmp.write_bytes(bytes(plan))
        atomic_write_bytes(tc_path, bytes(config.get_timing_cache().serialize()))
        engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
        if engine is None:
            raise EngineError(f"TensorRT built {name} but cannot deserialize it; see the messages above")
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        atomic_write_bytes(d / f"{name}.layers.json", info.encode() if isinstance(info, str) else bytes(info))
        layers[name] = engine.num_layers
        del inspector, engine, plan, network, parser, config  # free this engine's memory before the next build
    doc = {"key": build_key(m, trt.__version__, gpu), "options": asdict(opts), "layers": layers,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(d / BUILD_INFO, (json.dumps(doc, indent=2) + "\n").encode())
    return d

