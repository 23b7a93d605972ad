"""What runs without torch: ``import restok``, the schedule, and every module of the packages that serve
and run exports (runtime, calibration, serving, jobs, measure, tensorrt) and of the ground floor."""

import subprocess
import sys

from tests.support.torchless import TORCH_BLOCK

TORCH_FREE = ("restok.runtime", "restok.calibration", "restok.serving", "restok.jobs", "restok.measure",
              "restok.tensorrt")
GROUND = ("restok", "restok.schedule", "restok.noise", "restok.images", "restok.contract", "restok.manifest",
          "restok.sampling_params", "restok.fileutil", "restok.onnx_weights", "restok.configs")


def test_light_imports_without_torch():
    code = TORCH_BLOCK + """
import restok, restok.schedule, restok.noise, restok.images
s = restok.HARSchedule()
assert s.num_steps == 9
try:
    restok.load_generator
except ImportError as e:
    assert "restok[torch]" in str(e)
else:
    raise SystemExit("expected an ImportError naming the extra")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_torch_free_module_imports_without_torch():
    """Every module below the torch-free packages imports with torch blocked (the cuda and torch backends
    import it only when a backend is made); the list is walked, not written down, so a new module is
    covered the day it is added."""
    code = TORCH_BLOCK + f"""
import importlib, pkgutil
names = list({GROUND!r})
for pkg in {TORCH_FREE!r}:
    mod = importlib.import_module(pkg)
    names += [pkg] + [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")]
for n in names:
    importlib.import_module(n)
assert "torch" not in sys.modules
print(len(names))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) > 30  # the walk found the modules (runtime alone has 12)
