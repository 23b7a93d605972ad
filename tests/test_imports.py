"""``import restok`` and the schedule must not import torch (the runtime runs without it)."""

import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
"""


def test_light_imports_without_torch():
    code = BLOCK + """
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
