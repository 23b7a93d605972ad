#!/usr/bin/env bash
# One prepared check for a GPU machine (restok issue: TensorRT engines). Installs nothing.
#   scripts/gpu_check.sh [ARTIFACTS_DIR]
# ARTIFACTS_DIR: a tiny fp16 export made elsewhere (restok export --preset tiny --precision fp16 --out DIR);
# without it the script exports one here (needs torch + onnx + onnxscript). Writes $OUT/gpu_check.json
# (OUT defaults to ./out/gpu_check). Every stage has a timeout; the whole run stays under 8 minutes.
# Without TensorRT it still reports the PyTorch-on-GPU numbers.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
: > "$LOG"
step() {  # step NAME SECONDS CMD...: run with a timeout, keep stdout+stderr in the log, record the exit code
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" >> "$LOG"
  local t0=$(date +%s)
  timeout "$secs" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$OUT/stages.jsonl"
  return $rc
}
: > "$OUT/stages.jsonl"

# 1. probe (no installs)
"$PY" - > "$OUT/probe.json" 2>> "$LOG" <<'PYEOF'
import json, shutil, subprocess
p = {}
def mod(name):
    try:
        m = __import__(name)
        return getattr(m, "__version__", "present")
    except Exception as e:
        return None
for name in ("tensorrt", "torch", "onnx", "onnxscript", "onnxruntime", "polygraphy", "numpy", "tqdm", "PIL"):
    p[name] = mod(name)
try:
    import torch
    p["cuda"] = torch.cuda.is_available()
    p["gpu"] = torch.cuda.get_device_name(0) if p["cuda"] else None
except Exception:
    p["cuda"] = False
try:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    p["libnvinfer"] = [l.strip() for l in out.splitlines() if "nvinfer" in l][:4]
except Exception:
    p["libnvinfer"] = []
p["nvidia_smi"] = bool(shutil.which("nvidia-smi"))
print(json.dumps(p))
PYEOF
cat "$OUT/probe.json" >> "$LOG"
HAS_TRT=$("$PY" -c "import json;print(1 if json.load(open('$OUT/probe.json'))['tensorrt'] else 0)")

# 2. artifacts
ART="${1:-}"
if [ -z "$ART" ]; then
  ART="$OUT/tiny_fp16"
  step export 240 "$PY" -m restok export --preset tiny --precision fp16 --batch 1 --out "$ART"
fi

# 3. engines, parity and benchmark
if [ "$HAS_TRT" = 1 ]; then
  step build 180 "$PY" -m restok build --artifacts "$ART" --workspace 8
  step check 90 "$PY" -m restok check --artifacts "$ART" --backend tensorrt --device cuda --images 8 --json "$OUT/check.json"
  step bench 90 "$PY" -m restok bench --artifacts "$ART" --backends tensorrt,torch --device cuda --runs 5 --json "$OUT/bench.json"
else
  echo "TensorRT is not installed: PyTorch-on-GPU numbers only" >> "$LOG"
  step bench 120 "$PY" -m restok bench --artifacts "$ART" --backends torch --device cuda --runs 5 --json "$OUT/bench.json"
fi

# 4. one report
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return None
report = {"probe": load("probe.json"),
          "stages": [json.loads(l) for l in (out / "stages.jsonl").read_text().splitlines() if l.strip()],
          "check": load("check.json"), "bench": load("bench.json")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: v for k, v in report.items() if k != "check"}, indent=2)[:4000])
PYEOF
