"""The command line: generate writes PNGs, a grid, tokens and a JSON summary in runs of up to the export's
max batch; bench and check write JSON; bad input exits 2 with a message that names the problem."""

import json

import numpy as np
import pytest
from PIL import Image

from restok.cli import main
from restok.runtime import Pipeline


@pytest.mark.parametrize("n", [1, 3, 6])
def test_generate_any_number_of_classes(tiny_artifacts, tmp_path, capsys, n):
    """1, 3 and 6 classes on a max-batch-4 export; image k is the same whatever the batching."""
    classes = [1, 2, 3, 4, 5, 6][:n]
    out = tmp_path / "run"
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", *map(str, classes), "--seed", "3",
                 "--out", str(out), "--json", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_steps"] == 9 and len(summary["images"]) == n and len(summary["seconds"]["steps"]) == 9
    assert json.loads((out / "summary.json").read_text()) == summary
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (n, 128)
    pipe = Pipeline(tiny_artifacts)
    for k, c in enumerate(classes):  # the same image as generated alone
        g = pipe.generate([c], seed=3, noise_start=k)
        assert np.array_equal(g.tokens[0], tokens[k])
    img = Image.open(out / "0000_class1.png")
    assert img.size == (32, 32) and img.mode == "RGB"


def test_generate_backends_agree(tiny_artifacts, tmp_path):
    outs = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / backend
        assert main(["generate", "--artifacts", str(tiny_artifacts), "--backend", backend, "--classes", "1", "2", "3",
                     "--out", str(out)]) == 0
        outs[backend] = out
    t = {b: np.load(o / "tokens.npy") for b, o in outs.items()}
    assert np.array_equal(t["onnxruntime"], t["torch"])
    for i, c in enumerate([1, 2, 3]):
        a = np.asarray(Image.open(outs["onnxruntime"] / f"{i:04d}_class{c}.png"), dtype=np.int16)
        b = np.asarray(Image.open(outs["torch"] / f"{i:04d}_class{c}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_generate_bad_input(tiny_artifacts, tmp_path, capsys):
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "12", "--out", str(tmp_path / "o")]) == 2
    assert "class ids [12] are outside [0, 10)" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "--device applies to the torch and cuda backends" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--preset", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "drop --preset" in capsys.readouterr().err


def test_bad_model_options(tmp_path, capsys):
    assert main(["export", "--preset", "XL", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'XL'" in capsys.readouterr().err
    assert main(["export", "--tokenizer", str(tmp_path / "t.bin"), "--generator", str(tmp_path / "g.bin"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["export", "--tokenizer", "x", "--out", str(tmp_path / "x")]) == 2
    assert "--tokenizer and --generator go together" in capsys.readouterr().err
    assert main(["generate", "--artifacts", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_json(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--runs", "2", "--batch", "1", "4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in results] == [1, 4]
    for doc in results:
        assert set(doc["backends"]) == {"onnxruntime", "torch"}
        ort = doc["backends"]["onnxruntime"]
        assert len(ort["steps"]) == 9 and ort["end_to_end"]["median_ms"] > 0 and ort["images_per_second"] > 0
        assert 0 < ort["host_inputs_ms_per_image"] and doc["host_input_bytes_per_image"] <= 1024
        sp = doc["speedup_vs_reference"]["onnxruntime"]
        assert sp["end_to_end"] > 0 and sp["same_tokens"] is True
    assert "speedup" in capsys.readouterr().out


def test_check_cli(tiny_artifacts, tmp_path):
    out = tmp_path / "check.json"
    assert main(["check", "--artifacts", str(tiny_artifacts), "--images", "2", "--json", str(out),
                 "--polygraphy-dir", str(tmp_path / "pg")]) == 0
    r = json.loads(out.read_text())
    assert r["passed"] and (tmp_path / "pg" / "generator_pass0_inputs.json").exists()
    # an impossible threshold fails with exit code 1
    assert main(["check", "--artifacts", str(tiny_artifacts), "--images", "2", "--min-psnr", "1000",
                 "--polygraphy-dir", str(tmp_path / "pg")]) == 1


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes" in out and "130 interrupted" in out and "3 environment" in out
