import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_generator():
    from restok.models.presets import build_generator

    return build_generator("tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from restok.models.presets import build_tokenizer

    return build_tokenizer("tiny", seed=0)


# The exported tiny artifacts the tests share, made by the CLI in background processes started right after
# collection (each export is single-threaded Python: two cores run them beside the tests that need none,
# which run first). A fixture waits for its export and fails with the export's log if it failed.
EXPORTS = {
    # fp32, runs of 1..4 images, guided, with the encoder
    "tiny_artifacts": ["--preset", "tiny", "--max-batch", "4"],
    "tiny_artifacts_fp16": ["--preset", "tiny", "--precision", "fp16", "--no-encoder", "--max-batch", "4"],
    # the in-place KV cache (TensorScatter, opset 24) + its past/present fallback generator
    "tiny_artifacts_inplace": ["--preset", "tiny", "--max-batch", "4", "--kv-cache", "inplace", "--no-encoder"],
}
_EXPORTS: dict = {}  # fixture name -> (process, output folder, log file)


def _uses_exports(item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    params = set(map(str, callspec.params.values())) if callspec else set()
    return bool((names | params) & set(EXPORTS))


def pytest_collection_modifyitems(session, config, items):
    if not any(_uses_exports(it) for it in items):
        return
    items.sort(key=_uses_exports)  # stable: the tests that need no export run while the exports run
    base = Path(tempfile.mkdtemp(prefix="restok-test-artifacts-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, args in EXPORTS.items():
        out, log = base / name, base / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "restok", "export", *args, "--out", str(out)],
                                    stdout=f, stderr=subprocess.STDOUT, env=env)
        _EXPORTS[name] = (proc, out, log)
    _EXPORTS["_base"] = base


def pytest_sessionfinish(session, exitstatus):
    base = _EXPORTS.pop("_base", None)
    for proc, _, _ in _EXPORTS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


def _exported(name: str, tmp_path_factory) -> Path:
    if name not in _EXPORTS:  # collected without the hook's knowledge: export here
        from restok.cli import main

        out = tmp_path_factory.mktemp("artifacts") / name
        assert main(["export", *EXPORTS[name], "--out", str(out)]) == 0
        return out
    proc, out, log = _EXPORTS[name]
    rc = proc.wait(timeout=1800)
    assert rc == 0, f"restok export {' '.join(EXPORTS[name])} failed ({rc}):\n{log.read_text()[-4000:]}"
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """The tiny preset (seeded random weights) exported through the CLI: fp32, max batch 4, guided."""
    return _exported("tiny_artifacts", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_artifacts_fp16(tmp_path_factory):
    return _exported("tiny_artifacts_fp16", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_artifacts_inplace(tmp_path_factory):
    """The same model with the in-place KV cache (TensorScatter, opset 24)."""
    return _exported("tiny_artifacts_inplace", tmp_path_factory)
