#!/usr/bin/env bash
# One prepared check for a GPU machine (restok issue: TensorRT engines). Installs nothing.
#   scripts/gpu_check.sh [ARTIFACTS_DIR]
# ARTIFACTS_DIR: a tiny fp16 export made elsewhere (restok export --preset tiny --precision fp16 --out DIR;
# out/ is git-ignored, so a device run must carry it, e.g. carry ["out/tiny_fp16"]). Without it the script
# exports one here, which needs torch + onnx + onnxscript. Writes $OUT/gpu_check.json (OUT defaults to
# ./out/gpu_check); its first field says whether TensorRT is importable. Every stage has a timeout under one
# deadline: the whole run stays under 8 minutes. Two engines are built (the generator with one profile per
# HAR pass, the decoder; never the encoder); the report has their sizes and the device memory per image.
# Without TensorRT (or when its build fails) it still reports the PyTorch-on-GPU numbers.
set -u
ART_ARG="${1:-}"
[ -n "$ART_ARG" ] && ART_ARG="$(realpath -m "$ART_ARG")"  # before the cd below
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
SCRATCH="${TMPDIR:-/tmp}/restok_gpu_check"  # exports, engines and Polygraphy files: not copied back
mkdir -p "$SCRATCH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
: > "$LOG"
: > "$OUT/stages.jsonl"
DEADLINE=$(( $(date +%s) + 450 ))  # 7.5 minutes for the stages; the report takes seconds

record() {  # record NAME RC SECONDS [REASON]
  echo "{\"stage\": \"$1\", \"rc\": $2, \"seconds\": $3${4:+, \"reason\": \"$4\"}}" >> "$OUT/stages.jsonl"
}
step() {  # step NAME SECONDS CMD...: run with a timeout (capped by the deadline), log output, record the exit code
  local name=$1 secs=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    record "$name" 124 0 "skipped: the 8-minute deadline was reached"
    return 124
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "== $name (${secs}s): $*" >> "$LOG"
  local t0=$(date +%s)
  timeout -k 10 "$secs" "$@" >> "$LOG" 2>&1
  local rc=$?
  record "$name" "$rc" $(( $(date +%s) - t0 ))
  return $rc
}

# 1. probe (no installs)
timeout -k 5 60 "$PY" - > "$OUT/probe.json" 2>> "$LOG" <<'PYEOF'
import json, shutil, subprocess
p = {}
def mod(name):
    try:
        m = __import__(name)
        return getattr(m, "__version__", "present")
    except Exception:
        return None
for name in ("tensorrt", "torch", "onnx", "onnxscript", "onnxruntime", "polygraphy", "numpy", "tqdm", "PIL"):
    p[name] = mod(name)
p["cuda_python"] = mod("cuda.bindings.runtime") or mod("cuda.cudart")
try:
    import torch
    p["cuda"] = torch.cuda.is_available()
    p["torch_cuda"] = torch.version.cuda
    p["gpu"] = torch.cuda.get_device_name(0) if p["cuda"] else None
except Exception:
    p["cuda"] = False
try:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    p["libnvinfer"] = [l.strip() for l in out.splitlines() if "nvinfer" in l][:4]
except Exception:
    p["libnvinfer"] = []
if shutil.which("nvidia-smi"):
    try:
        p["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        p["nvidia_smi"] = f"failed: {e}"
print(json.dumps(p))
PYEOF
[ -s "$OUT/probe.json" ] || echo '{"probe": "failed or timed out"}' > "$OUT/probe.json"
cat "$OUT/probe.json" >> "$LOG"
probe() { "$PY" -c "import json,sys;d=json.load(open('$OUT/probe.json'));print(1 if d.get(sys.argv[1]) else 0)" "$1" 2>/dev/null || echo 0; }
HAS_TRT=0
[ "$(probe tensorrt)" = 1 ] && [ "$(probe cuda_python)" = 1 ] && HAS_TRT=1

# 2. artifacts
ART="$ART_ARG"
if [ -z "$ART" ]; then
  ART="$SCRATCH/tiny_fp16"
  if [ "$(probe onnxscript)" = 1 ]; then
    step export 240 "$PY" -m restok export --preset tiny --precision fp16 --max-batch 16 --out "$ART"
  else
    record export 127 0 "onnxscript missing: export on a CPU machine and pass the folder (carry it)"
  fi
fi

# 3. engines, parity and benchmark
if [ ! -f "$ART/manifest.json" ]; then
  echo "no export at $ART: nothing to build or measure" >> "$LOG"
else
  BENCH_TORCH=1
  if [ "$HAS_TRT" = 1 ]; then
    # two engines (generator: 9 profiles x batch 1..16; decoder) at opt level 3; the tiny preset builds in
    # well under the 240 s given (the former 11 per-pass engines were budgeted 180 s)
    if step build 240 "$PY" -m restok build --artifacts "$ART" --workspace 8 --json "$OUT/build.json"; then
      step check 90 "$PY" -m restok check --artifacts "$ART" --backend tensorrt --device cuda --images 8 \
        --polygraphy-dir "$SCRATCH/polygraphy" --json "$OUT/check.json"
      step bench 90 "$PY" -m restok bench --artifacts "$ART" --backends tensorrt,torch --device cuda --runs 5 \
        --batch 1 8 16 --json "$OUT/bench.json" && BENCH_TORCH=0
    fi
  else
    echo "TensorRT or cuda-python is not installed: PyTorch-on-GPU numbers only" >> "$LOG"
  fi
  if [ "$BENCH_TORCH" = 1 ]; then
    step bench_torch 90 "$PY" -m restok bench --artifacts "$ART" --backends torch --device cuda --runs 5 --batch 1 8 \
      --json "$OUT/bench.json"
  fi
fi

# 4. one report
timeout -k 5 30 "$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception:
        return None
probe = load("probe.json") or {}
build = load("build.json") or {}
report = {"tensorrt_importable": bool(probe.get("tensorrt")),
          "tensorrt_version": probe.get("tensorrt"),
          "probe": probe,
          "stages": [json.loads(l) for l in (out / "stages.jsonl").read_text().splitlines() if l.strip()],
          "engines": {k: build.get(k) for k in ("engine_bytes", "engine_memory", "weights_bytes", "scratch_bytes",
                                                 "buffer_bytes_at_max_batch", "device_bytes_per_image")} if build else None,
          "check": load("check.json"), "bench": load("bench.json"),
          "log_tail": (out / "log.txt").read_text(errors="replace")[-4000:]}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: v for k, v in report.items() if k not in ("check", "log_tail")}, indent=2)[:4000])
PYEOF
