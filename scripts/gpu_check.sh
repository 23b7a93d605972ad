#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (restok issue 20). Installs nothing; JSON out.
#   scripts/gpu_check.sh [ARTIFACTS_DIR]
# 1. probe: what the machine has (torch + CUDA, TensorRT, cuda-python, ONNX tools).
# 2. the bundled model exported here (torch + onnx + onnxscript, seconds), then `restok check --backend cuda`
#    in fp32 (parity rung) and bf16 (the fast configuration's gate) against the float32 PyTorch reference.
# 3. python -m restok.measure.gpu: cuda vs ONNX Runtime tokens on the bundled export; batch sizes alternating
#    1, 16, 3, 16, 1 with graph replay equal to eager and pass by pass; the L preset (seeded weights, held in
#    memory): batch-1 latency, images/s at 64 and 256, peak device memory, kernels and host launches per
#    image, host time per image, graphs on and off, bf16 vs fp32, batch invariance of 64 images.
# 4. TensorRT stages only when TensorRT and cuda-python import (ARTIFACTS_DIR: a tiny fp16 export made
#    elsewhere, carried; default: exported here).
# Writes $OUT/gpu_check.json (OUT defaults to ./out/gpu_check). Every stage has a timeout under one deadline
# of 6 minutes; a stage that runs out leaves what it measured so far.
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
DEADLINE=$(( $(date +%s) + 340 ))  # under 6 minutes for the stages; the report takes seconds
export RESTOK_CACHE="$SCRATCH/cache"  # never the user's cache

record() {  # record NAME RC SECONDS [REASON]
  echo "{\"stage\": \"$1\", \"rc\": $2, \"seconds\": $3${4:+, \"reason\": \"$4\"}}" >> "$OUT/stages.jsonl"
}
step() {  # step NAME SECONDS CMD...: run with a timeout (capped by the deadline), log output, record the exit code
  local name=$1 secs=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    record "$name" 124 0 "skipped: the 6-minute deadline was reached"
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

# 2. the cuda backend on the bundled model: gates against the float32 reference
BUNDLED="$SCRATCH/bundled"
if [ "$(probe cuda)" = 1 ]; then
  if [ "$(probe onnxscript)" = 1 ]; then
    step export_bundled 90 "$PY" -m restok export --no-encoder --out "$BUNDLED"
  else
    record export_bundled 127 0 "onnxscript missing"
  fi
  if [ -f "$BUNDLED/manifest.json" ]; then
    for prec in fp32 bf16; do
      step "check_cuda_$prec" 60 "$PY" -m restok check --artifacts "$BUNDLED" --backend cuda --device cuda \
        --compute-precision "$prec" --images 16 --polygraphy-dir "$SCRATCH/polygraphy_$prec" --json "$OUT/check_cuda_$prec.json"
    done
    MEASURE_ART=(--artifacts "$BUNDLED")
  else
    MEASURE_ART=()
  fi
  # 3. the measurements (the L preset's models are built on the host: about a minute of it)
  step measure 240 "$PY" -m restok.measure.gpu "${MEASURE_ART[@]}" --preset L --device cuda --batches 1 64 256 \
    --profile-batches 1 64 --runs 5 --invariance-images 64 --json "$OUT/measure.json"
else
  record cuda 1 0 "PyTorch sees no CUDA device"
fi

# 4. TensorRT, where it imports
if [ "$HAS_TRT" = 1 ]; then
  ART="$ART_ARG"
  if [ -z "$ART" ]; then
    ART="$SCRATCH/tiny_fp16"
    step export_tiny_fp16 60 "$PY" -m restok export --preset tiny --precision fp16 --max-batch 16 --out "$ART"
  fi
  if [ -f "$ART/manifest.json" ] && step build 120 "$PY" -m restok build --artifacts "$ART" --workspace 8 --json "$OUT/build.json"; then
    step check_tensorrt 60 "$PY" -m restok check --artifacts "$ART" --backend tensorrt --device cuda --images 8 \
      --polygraphy-dir "$SCRATCH/polygraphy" --json "$OUT/check_tensorrt.json"
    step bench_tensorrt 60 "$PY" -m restok bench --artifacts "$ART" --backends tensorrt,cuda --device cuda --runs 5 \
      --batch 1 8 16 --json "$OUT/bench_tensorrt.json"
  fi
else
  echo "TensorRT or cuda-python is not installed: no TensorRT stages" >> "$LOG"
fi

# 5. one report
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
          "check_cuda_fp32": load("check_cuda_fp32.json"), "check_cuda_bf16": load("check_cuda_bf16.json"),
          "measure": load("measure.json"),
          "check_tensorrt": load("check_tensorrt.json"), "bench_tensorrt": load("bench_tensorrt.json"),
          "log_tail": (out / "log.txt").read_text(errors="replace")[-4000:]}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: v for k, v in report.items() if not k.startswith("check") and k != "log_tail"}, indent=2)[:6000])
PYEOF
