"""The export cache (restok.export.cache): without --artifacts the model is exported into the cache once, then
reused, also when two processes need it at the same time."""

import subprocess
import sys

import numpy as np

from restok.cli import build_parser
from tests.support.cli import ENV


def test_cache_exports_once(tiny_artifacts, tmp_path, monkeypatch):
    """Without --artifacts the model is exported into the cache once, then reused."""
    import shutil

    import restok.export.cache as cache
    from restok.cli.common import artifacts

    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_export(tok, gen, out, opts, source=None, **kw):
        calls.append(out)
        shutil.copytree(tiny_artifacts, out)

    monkeypatch.setattr(cache, "export_artifacts", fake_export)
    args = build_parser().parse_args(["generate", "--preset", "tiny", "--max-batch", "4", "--out", str(tmp_path / "o")])
    a, b = artifacts(args), artifacts(args)
    assert a == b and len(calls) == 1 and str(a).startswith(str(tmp_path / "cache"))


def test_first_use_exports_once(tmp_path):
    """Two generate runs that both need the model exported into the cache: one exports, the other waits."""
    env = {"RESTOK_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "restok", "generate", "--preset", "tiny", "--max-batch", "2", "--no-encoder", "--classes", "1"]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"o{i}")], env={**ENV, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert sum(e.count("exporting the model into") for e in errs) == 1
    assert np.array_equal(np.load(tmp_path / "o0" / "tokens.npy"), np.load(tmp_path / "o1" / "tokens.npy"))
