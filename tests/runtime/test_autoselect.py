"""--backend auto (restok.runtime.autoselect): picks a gated configuration, says which, and remembers the
measurement."""

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'restok[openvino]'")

from restok.cli import main  # noqa: E402
from restok.runtime import Pipeline  # noqa: E402


def test_backend_auto_chooses_and_remembers(tiny_artifacts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "--artifacts", str(tiny_artifacts), "--backend", "auto", "--classes", "1", "2"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "--backend auto chose" in err and "measuring openvino fp32" in err
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "--backend auto chose" in err and "measuring" not in err  # remembered
    import json

    chosen = json.loads((tmp_path / "a" / "summary.json").read_text())["backend"]
    assert chosen in ("onnxruntime", "openvino")
    if chosen == "onnxruntime":  # every candidate is gated; the choice draws the reference's tokens
        assert np.array_equal(np.load(tmp_path / "a" / "tokens.npy"), Pipeline(tiny_artifacts).generate([1, 2]).tokens)
