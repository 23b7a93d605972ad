"""Outputs under a real SIGKILL: an export or a calibration killed at any point — while it works, right when
its folder is complete, during the swap — leaves the previous output valid at the path (and files restok did
not write untouched); the next run removes what the dead process left."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from restok.manifest import Manifest
from tests.support.cli import ENV


def _kill_when(cmd, ready, timeout=600):
    """Start ``cmd``, SIGSTOP it as soon as ``ready()`` is true (polled every millisecond), then SIGKILL it.
    Returns False if the process ended first."""
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not ready():
        time.sleep(0.001)
    alive = p.poll() is None
    if alive:
        p.send_signal(signal.SIGSTOP)
        p.send_signal(signal.SIGKILL)
    p.wait()
    return alive


def _stage_complete(parent: Path, name: str):
    return lambda: any((s / "manifest.json").exists() for s in parent.glob(f".{name}.partial-*"))


def _stage_started(parent: Path, name: str, seconds: float):
    t0 = time.time()
    return lambda: time.time() - t0 > seconds and any(parent.glob(f".{name}.partial-*"))


@pytest.fixture
def previous(tiny_artifacts, tmp_path):
    import shutil

    out = tmp_path / "art"
    shutil.copytree(tiny_artifacts, out)
    (out / "NOTES.md").write_text("mine")
    return out


def _still_valid(out: Path) -> int:
    m = Manifest.read(out)  # verifies every file's sha256
    assert (out / "NOTES.md").read_text() == "mine"
    return m.max_batch


def test_killed_exports_leave_a_valid_export(previous):
    cmd = [sys.executable, "-m", "restok", "export", "--preset", "tiny", "--max-batch", "2", "--no-encoder",
           "--out", str(previous)]
    parent, name = previous.parent, previous.name
    for ready in (_stage_started(parent, name, 2.0), _stage_complete(parent, name)):
        assert _kill_when(cmd, ready), "the export ended before it could be killed"
        assert _still_valid(previous) in (4, 2)  # the old export, or the new one if the swap was done
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _still_valid(previous) == 2
    assert not list(parent.glob(f".{name}.partial-*")) and not list(parent.glob(f".{name}.old-*"))


def test_killed_calibrations_leave_a_valid_output(tiny_artifacts, tmp_path):
    out = tmp_path / "int8"
    base = [sys.executable, "-m", "restok", "calibrate", "--artifacts", str(tiny_artifacts), "--samples", "2",
            "--gate-images", "2", "--min-token-agreement", "0", "--min-psnr", "0", "--threads", "1", "--out", str(out)]
    p = subprocess.run(base + ["--precision", "int8-weight-only"], env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    (out / "NOTES.md").write_text("mine")
    cmd = base + ["--precision", "int8"]
    for ready in (_stage_started(tmp_path, "int8", 0.5), _stage_complete(tmp_path, "int8")):
        assert _kill_when(cmd, ready), "the calibration ended before it could be killed"
        m = Manifest.read(out)
        assert m.precision in ("int8-weight-only", "int8") and (out / "NOTES.md").read_text() == "mine"
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Manifest.read(out).precision == "int8" and not list(tmp_path.glob(".int8.partial-*"))
