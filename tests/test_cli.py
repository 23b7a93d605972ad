"""The command line: generate writes PNGs, a grid and a JSON summary; bad input exits 2 with a message."""

import json

import numpy as np

from PIL import Image

from restok.cli import main


def test_generate_tiny(tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(["generate", "--preset", "tiny", "--classes", "1", "2", "3", "--batch", "2", "--out", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_steps"] == 9 and len(summary["images"]) == 3
    assert json.loads((out / "summary.json").read_text()) == summary
    img = Image.open(out / "0000_class1.png")
    assert img.size == (64, 64) and img.mode == "RGB"
    assert Image.open(out / "grid.png").size[0] > 64 * 3
    # batching does not change the tokens (the images only by float rounding of batched matmuls)
    out2 = tmp_path / "gen2"
    assert main(["generate", "--preset", "tiny", "--classes", "1", "2", "3", "--batch", "3", "--out", str(out2)]) == 0
    assert np.array_equal(np.load(out / "tokens.npy"), np.load(out2 / "tokens.npy"))
    assert np.load(out / "tokens.npy").shape == (3, 128)
    for i, c in enumerate([1, 2, 3]):
        a = np.asarray(Image.open(out / f"{i:04d}_class{c}.png"), dtype=np.int16)
        b = np.asarray(Image.open(out2 / f"{i:04d}_class{c}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


def test_generate_bad_class(tmp_path, capsys):
    rc = main(["generate", "--preset", "tiny", "--classes", "12", "--out", str(tmp_path)])
    assert rc == 2
    assert "class ids [12] are outside [0, 10)" in capsys.readouterr().err


def test_generate_bad_preset_and_checkpoint(tmp_path, capsys):
    assert main(["generate", "--preset", "XL", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'XL'" in capsys.readouterr().err
    assert main(["generate", "--generator", str(tmp_path / "missing.bin"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
