"""restok's CLI in a subprocess, as a user runs it: the environment (one OpenMP thread, this checkout on
PYTHONPATH), and the check that an error is one line with no traceback."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_cli(*args, env=None, timeout=600):
    """The CLI in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "restok", *map(str, args)], capture_output=True, text=True,
                       env={**ENV, **(env or {})}, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def one_line_error(err: str) -> None:
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-2000:]
