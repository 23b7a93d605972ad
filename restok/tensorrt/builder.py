"""TensorRT engines from an export: one generator engine with one optimization profile per HAR pass, one
decoder engine (and an encoder engine only when asked), cached under the export and keyed by what they
depend on (the ONNX files' sha256, precision, max batch, TensorRT version, GPU).

Why one generator engine with nine profiles rather than nine engines: the weights are stored once (GPT-L
fp16: 0.65 GB instead of 9 x 0.65 GB), while each profile still gets kernels tuned for its pass (its new
positions and cached length are fixed: min = opt = max; only the batch ranges over 1..max batch, tuned at
``opt_batch``). The runtime holds one execution context per profile; contexts of one engine share its
weights (TensorRT: "Multiple IExecutionContexts may exist for one ICudaEngine"; a context only holds
activation memory, which restok gives it: one user-managed scratch shared by all contexts, which never run
concurrently; checked in NvInferRuntime.h setDeviceMemoryV2 for 10.3-11.1).

Precision comes from the graphs (TensorRT 11 networks are strongly typed; on 10.x we ask for strong
typing): fp32/fp16 exports, or int8/fp8 Q/DQ artifacts from ``restok calibrate``. TF32 stays off for fp32
engines (TensorRT enables it by default): fp32 artifacts are the parity reference. TensorRT is imported
only here and in the TensorRT backend.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from restok.contract import GraphSpec, batch_dims, pass_dims
from restok.fileutil import atomic_path, atomic_write_bytes
from restok.manifest import Manifest
from restok.tensorrt.cuda import compute_capability, gpu_identity
from restok.tensorrt.lint import tensorrt_line, tensorrt_summary

BUILD_INFO = "build.json"
MIN_TENSORRT = (10, 3)  # user-managed context memory with v2 sizes (10.1), tested API surface from 10.3
INPLACE_TENSORRT = (10, 15)  # ONNX TensorScatter -> IKVCacheUpdateLayer
ATTENTION_TENSORRT = (10, 14)  # ONNX Attention (what fp32 attention exports as at opset >= 23)


class EngineError(RuntimeError):
    """Engines are missing, stale or cannot be built; the message says what to do."""


@dataclass
class BuildOptions:
    workspace_gb: float = 8.0
    opt_level: int = 3
    timing_cache: str = ""  # default: <engine folder>/timing.cache (one per TensorRT version and GPU)
    opt_batch: int | None = None  # the batch TensorRT tunes for; default min(8, max batch)
    encoder: bool = False  # the encoder engine is built only when asked (generation never uses it)
    log_level: str | None = None  # TensorRT's logger: error, warning, info, verbose (default: log_level())

    def validate(self, m: Manifest | None = None) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"--opt-level must be in 0..5, got {self.opt_level}")
        if not self.workspace_gb > 0:
            raise ValueError(f"--workspace must be > 0 GB, got {self.workspace_gb}")
        if m is not None and self.opt_batch is not None and not 1 <= self.opt_batch <= m.max_batch:
            raise ValueError(f"--opt-batch must be in 1..{m.max_batch} (the export's max batch), got {self.opt_batch}")

    def batch_for(self, m: Manifest) -> int:
        return opt_batch_for(m, self.opt_batch)


def opt_batch_for(m: Manifest, opt_batch: int | None) -> int:
    """The batch TensorRT tunes kernels for: the one asked, else 8 (a common serving batch) or the max batch."""
    return opt_batch or min(8, m.max_batch)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(
            "TensorRT is not installed here (import tensorrt failed). On a machine with an NVIDIA GPU: "
            "pip install 'restok[tensorrt]' --extra-index-url https://pypi.nvidia.com"
        ) from e
    return trt


LOG_LEVELS = ("error", "warning", "info", "verbose")


def log_level(name: str | None = None) -> str:
    """TensorRT's log level: ``name``, else $RESTOK_TENSORRT_LOG_LEVEL, else warning."""
    level = (name or os.environ.get("RESTOK_TENSORRT_LOG_LEVEL") or "warning").lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"TensorRT log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def trt_logger(trt, level: str | None = None):
    return trt.Logger(getattr(trt.Logger, log_level(level).upper()))


def check_gpu(m: Manifest, gpu: dict) -> None:
    """Refuse artifacts whose precision this GPU cannot run, before a build fails with an unrelated message:
    FP8 (E4M3) tensor cores exist from compute capability 8.9 (Ada, Hopper); an A100 (8.0) or a Jetson Orin
    (8.7) has none, and TensorRT's builder then fails without saying why."""
    cc = compute_capability(gpu)
    if m.precision == "fp8" and cc < (8, 9):
        raise EngineError(f"FP8 engines need compute capability >= 8.9 (Ada, Hopper); {gpu['name']} is "
                          f"{gpu['compute_capability']}: make int8 or fp16 artifacts instead "
                          "(restok calibrate --precision int8, restok export --precision fp16)")


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def engine_dir(folder: Path, trt_version: str, gpu: dict) -> Path:
    return Path(folder) / "engines" / _slug(f"trt{trt_version}") / _slug(f"{gpu['name']}_sm{gpu['compute_capability']}")


def engine_graphs(m: Manifest, encoder: bool) -> dict[str, GraphSpec]:
    """The graphs that get engines: the generator and the decoder, the encoder only when asked."""
    return {k: g for k, g in m.graphs.items() if k != "encoder" or encoder}


def build_key(m: Manifest, trt_version: str, gpu: dict, opt_batch: int | None = None) -> dict:
    """Everything an engine depends on; stored in build.json and compared before any engine is used."""
    return {
        "onnx_sha256": {name: m.files[g.file]["sha256"] for name, g in sorted(engine_graphs(m, True).items())},
        "weights_sha256": {k: m.files[k]["sha256"] for k in sorted(m.weights)},
        "precision": m.precision, "max_batch": m.max_batch, "guided": m.guided, "kv_cache": m.kv_cache,
        "opt_batch": opt_batch_for(m, opt_batch),
        "tensorrt": trt_version, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"],
    }


def check_engines(folder: Path, m: Manifest, trt_version: str, gpu: dict) -> tuple[Path, dict]:
    """(engine folder, build.json) for this TensorRT and GPU, after refusing anything stale, with the reason."""
    d = engine_dir(folder, trt_version, gpu)
    info_path = d / BUILD_INFO
    if not info_path.is_file():
        raise EngineError(f"no engines for TensorRT {trt_version} on {gpu['name']} in {d.parent.parent}; "
                          f"run: restok build --artifacts {folder}")
    try:
        info = json.loads(info_path.read_text())
        have = info["key"]
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError(f"{info_path} is damaged ({e}); rebuild: restok build --artifacts {folder}") from e
    want = build_key(m, trt_version, gpu, have.get("opt_batch"))
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise EngineError(f"engines in {d} were built for a different {', '.join(diff)}; "
                          f"rebuild them: restok build --artifacts {folder}")
    for name in info.get("engines", []):
        if not (d / f"{name}.plan").is_file():
            raise EngineError(f"{d / (name + '.plan')} is missing; rebuild: restok build --artifacts {folder}")
    return d, info


def tensorrt_manifest(m: Manifest, trt_version: str) -> Manifest:
    """The graphs this TensorRT builds: the export itself, or for an in-place KV-cache export on TensorRT
    < 10.15 its past/present fallback generator (with a warning naming the version). Anything this
    TensorRT cannot parse is refused, saying which export works instead."""
    if m.precision == "int8-dynamic":
        raise EngineError("int8-dynamic artifacts use ONNX Runtime's DynamicQuantizeMatMul, which TensorRT cannot parse; "
                          "for TensorRT make Q/DQ artifacts with restok calibrate --precision int8 (or fp8)")
    v = version_tuple(trt_version)
    if v < MIN_TENSORRT:
        raise EngineError(f"TensorRT {trt_version} is too old: restok builds with TensorRT >= 10.3 (10.x or 11.x)")
    if m.kv_cache == "inplace" and v < INPLACE_TENSORRT:
        if m.fallback.get("kv_cache") != "concat":
            raise EngineError(
                f"TensorRT {trt_version} cannot parse the in-place KV cache (ONNX TensorScatter needs TensorRT >= 10.15) "
                "and these artifacts carry no past/present fallback graph; re-export with --kv-cache concat")
        msg = (f"TensorRT {trt_version} has no in-place KV-cache update (needs >= 10.15): using the past/present "
               "generator graph of this export instead (the KV cache is copied between passes)")
        warnings.warn(msg, stacklevel=2)
        print(f"restok: warning: {msg}", file=sys.stderr)
        m = m.kv_cache_view("concat")
    for name, g in m.graphs.items():
        opset = g.opset or m.opset
        if opset > 24:
            raise EngineError(f"{g.file} has opset {opset}: TensorRT parses opsets up to 24; re-export with --opset 20")
        if opset >= 23 and v < ATTENTION_TENSORRT:
            raise EngineError(f"{g.file} has opset {opset}, where fp32 attention is the ONNX Attention operator, which "
                              f"TensorRT parses from 10.14 (this is {trt_version}); re-export with --opset 20 "
                              "(and --kv-cache concat)")
    return m


def generator_profiles(m: Manifest, opt_batch: int) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """One profile per pass: {input: (min, opt, max)}; the pass's shapes with batch 1, opt_batch, max batch."""
    g = m.graphs["generator"]
    batches = (1, opt_batch, m.max_batch)
    return [{t.name: tuple(t.resolve(pass_dims(st, b, m.guided)) for b in batches) for t in g.inputs}
            for st in m.har_schedule().steps]


def batch_profile(g: GraphSpec, m: Manifest, opt_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    return {t.name: tuple(t.resolve(batch_dims(b)) for b in (1, opt_batch, m.max_batch)) for t in g.inputs}


class _Progress:
    """A TensorRT IProgressMonitor printing phases to stderr (created only when tensorrt is importable)."""

    @staticmethod
    def make(trt, label: str):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):  # TensorRT's argument order
                if parent_phase is None:
                    print(f"  {label}: {phase_name}", file=sys.stderr)

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                pass

        return Monitor()


def _build_one(trt, builder, logger, name: str, path: Path, profiles: list[dict], opts: BuildOptions, tc_path: Path,
               fp32: bool) -> bytes:
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gb * (1 << 30)))
    config.builder_optimization_level = opts.opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if fp32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if hasattr(config, "progress_monitor"):
        config.progress_monitor = _Progress.make(trt, name)
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}  # TensorRT drops unused inputs
    for prof in profiles:
        p = builder.create_optimization_profile()
        for tensor, (mn, opt, mx) in prof.items():
            if tensor in inputs:
                p.set_shape(tensor, mn, opt, mx)
        if config.add_optimization_profile(p) < 0:
            raise EngineError(f"TensorRT refused an optimization profile of {name}: {prof}")
    cache = config.create_timing_cache(tc_path.read_bytes() if tc_path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"restok build: {tc_path} does not fit this TensorRT/GPU; starting a new timing cache", file=sys.stderr)
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise EngineError("TensorRT refused an empty timing cache")
    print(f"restok build: {name} ({path.name}, {len(profiles)} profile{'s' * (len(profiles) > 1)})", file=sys.stderr)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {name}; see the messages above (out of memory? "
                          "try --workspace with less, or --opt-level 2)")
    atomic_write_bytes(tc_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _engine_memory(trt, engine) -> dict:
    """Scratch (activation) bytes over all profiles and per profile, and the weights' bytes where TensorRT
    reports them (10.14+: EngineStat.TOTAL_WEIGHTS_SIZE)."""
    scratch = int(engine.device_memory_size_v2)
    per = [int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(engine.num_optimization_profiles)]
    stat = getattr(trt, "EngineStat", None)
    weights = int(engine.get_engine_stat(stat.TOTAL_WEIGHTS_SIZE)) if stat is not None and hasattr(engine, "get_engine_stat") else None
    return {"scratch_bytes": scratch, "scratch_bytes_per_profile": per, "weights_bytes": weights}


def memory_budget(m: Manifest, engines: dict[str, dict], plan_bytes: dict[str, int]) -> dict:
    """Device memory of one runtime: weights (once), one shared scratch, the plan's buffers at max batch;
    ``device_bytes_per_image`` is what each image of a full batch adds beyond the weights."""
    from restok.runtime.plan import BindingPlan

    plan = BindingPlan(m)
    buffers = sum(b.nbytes for b in plan.buffers.values())
    scratch = max((e["scratch_bytes"] for e in engines.values()), default=0)
    weights = sum(e["weights_bytes"] if e["weights_bytes"] is not None else plan_bytes[k] for k, e in engines.items())
    return {"weights_bytes": weights, "scratch_bytes": scratch, "buffer_bytes_at_max_batch": buffers,
            "device_bytes_per_image": (scratch + buffers) // m.max_batch,
            "total_bytes_at_max_batch": weights + scratch + buffers}


def build_engines(folder: str | Path, options: BuildOptions | None = None) -> dict:
    """Build (or reuse) the engines of an export for this TensorRT and GPU. Returns the build record."""
    opts = options or BuildOptions()
    folder = Path(folder)
    m = Manifest.read(folder)
    opts.validate(m)
    trt = import_tensorrt()
    m = tensorrt_manifest(m, trt.__version__)
    gpu = gpu_identity()
    check_gpu(m, gpu)
    want = ["generator", "decoder"] + (["encoder"] if opts.encoder and "encoder" in m.graphs else [])
    if opts.encoder and "encoder" not in m.graphs:
        raise EngineError("--encoder: these artifacts have no encoder graph (exported with --no-encoder)")
    lint = tensorrt_summary(folder, tuple(want))  # what the parser would reject, said before a long build
    if lint.get("linted") and not lint["parses"]:
        raise EngineError(f"{tensorrt_line(lint)}; re-export the artifacts with this restok")
    try:
        d, info = check_engines(folder, m, trt.__version__, gpu)
        if info.get("key", {}).get("opt_batch") == opts.batch_for(m) and set(want) <= set(info.get("engines", [])):
            return {**info, "engines_dir": str(d), "reused": True}
    except EngineError:
        pass  # build below
    d = engine_dir(folder, trt.__version__, gpu)
    d.mkdir(parents=True, exist_ok=True)
    (d / BUILD_INFO).unlink(missing_ok=True)  # engines without a matching build.json are never used
    logger = trt_logger(trt, opts.log_level)
    builder = trt.Builder(logger)
    tc_path = Path(opts.timing_cache) if opts.timing_cache else d / "timing.cache"
    ob = opts.batch_for(m)
    fp32 = m.precision == "fp32"
    memory, sizes, layers = {}, {}, {}
    for name in want:
        g = m.graphs[name]
        profiles = generator_profiles(m, ob) if name == "generator" else [batch_profile(g, m, ob)]
        plan = _build_one(trt, builder, logger, name, folder / g.file, profiles, opts, tc_path, fp32)
        with atomic_path(d / f"{name}.plan") as tmp:
            tmp.write_bytes(plan)
        sizes[name] = len(plan)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(f"TensorRT built {name} but cannot deserialize it; see the messages above")
        memory[name] = _engine_memory(trt, engine)
        inspector = engine.create_engine_inspector()
        li = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        atomic_write_bytes(d / f"{name}.layers.json", li.encode() if isinstance(li, str) else bytes(li))
        layers[name] = engine.num_layers
        del inspector, engine, plan  # free this engine's memory before the next build
    doc = {"key": build_key(m, trt.__version__, gpu, ob), "engines": want, "options": asdict(opts),
           "layers": layers, "engine_bytes": sizes, "engine_memory": memory,
           **memory_budget(m, {k: v for k, v in memory.items() if k != "encoder"}, sizes),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(d / BUILD_INFO, (json.dumps(doc, indent=2) + "\n").encode())
    return {**doc, "engines_dir": str(d), "reused": False}
