"""restok check (restok.measure.parity): PyTorch vs ONNX Runtime parity of an fp32 export, Polygraphy replay
files, and checking an export shipped elsewhere whose checkpoints moved (named explicitly and verified)."""

import shutil
import subprocess
import sys
from pathlib import Path

from restok.cli import main
from restok.measure.parity import run_check
from tests.support.cli import one_line_error as _one_line_error
from tests.support.cli import run_cli as _cli


def test_parity_fp32(tiny_artifacts):
    r = run_check(tiny_artifacts, images=16)
    assert r["passed"], r["summary"]
    assert len(r["steps"]) == 9
    for s in r["steps"]:
        assert s["logits_max_abs_error"] <= 1e-3
        assert s["logits_std"] > 0.1  # the compared logits vary: the check is not vacuous
        assert s["tokens_identical"] == 1.0
    assert r["generation"]["token_agreement"] == 1.0 and r["generation"]["identical_images"] == 16
    assert r["decoder"]["psnr_db"] >= 60 and r["decoder"]["image_std"] > 0.05
    assert r["encoder"]["ids_identical"] == 1.0


def test_polygraphy_replay_of_a_pass(tiny_artifacts, tmp_path):
    r = run_check(tiny_artifacts, images=2, polygraphy_dir=tmp_path / "pg")
    cmd = r["polygraphy"]["replay"]["generator_pass5"].split() + ["--atol", "1e-3", "--rtol", "1e-3"]
    exe = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    p = subprocess.run([exe] + cmd[1:], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "PASSED" in p.stdout + p.stderr


def test_check_from_another_place_with_moved_checkpoints(golden_generator_artifacts, golden_generator_artifacts_inplace,
                                                         tmp_path, monkeypatch):
    """An export records its checkpoints by path and by their weights' sha256: moved checkpoints are named
    explicitly, and verified. The session's export of a checkpoint is reused (an export costs half a minute
    here); its checkpoint folder is moved away for this test and put back (both exports of it are done)."""
    from restok.checkpoints import load_generator, load_tokenizer, save_checkpoint
    from restok.models.presets import build_generator

    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    recorded = golden_generator_artifacts.parent / "golden_gen_ck"  # tests/support/exports.py: EXPORTS
    shipped = Path(shutil.copytree(golden_generator_artifacts, tmp_path / "shipped"))  # CI's build job -> check job
    moved = tmp_path / "elsewhere"
    shutil.move(str(recorded), str(moved))
    try:
        rc, _, err = _cli("check", "--artifacts", shipped, "--images", "1", "--polygraphy-dir", tmp_path / "pg")
        assert rc == 2 and str(recorded / "tokenizer") in err and "--tokenizer/--generator" in err
        _one_line_error(err)
        rc, _, err = _cli("check", "--artifacts", shipped, "--images", "1", "--polygraphy-dir", tmp_path / "pg",
                          "--tokenizer", moved / "tokenizer", "--generator", moved / "generator")
        assert rc == 0, err[-2000:]
        other = tmp_path / "other"
        save_checkpoint(load_tokenizer(moved / "tokenizer"), other / "tokenizer")
        save_checkpoint(build_generator(load_generator(moved / "generator").cfg, seed=99), other / "generator")
        rc, _, err = _cli("check", "--artifacts", shipped, "--images", "1", "--checkpoint", other,
                          "--polygraphy-dir", tmp_path / "pg")
        assert rc == 2 and "not the ones these artifacts were exported from" in err
    finally:
        shutil.move(str(moved), str(recorded))
