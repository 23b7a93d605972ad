"""No silent wrong result, no lost work, no raw traceback: each case of the reliability issue, on real files
and real processes (the CLI in a subprocess where a traceback could leak)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from restok.cli import main
from restok.manifest import Manifest
from tests.support.cli import ENV
from tests.support.cli import one_line_error as _one_line_error
from tests.support.cli import run_cli as _cli


# ------------------------------------------------------------------------- silent wrong results


def test_no_verify_is_explicit_and_said(copy, tmp_path):
    w = copy / "tokenizer" / "weights.bin"
    b = bytearray(w.read_bytes())
    b[-1] ^= 0x01
    w.write_bytes(bytes(b))
    rc, _, err = _cli("generate", "--artifacts", copy, "--classes", "1", "--out", tmp_path / "o")
    assert rc == 2 and "does not match the sha256" in err
    _one_line_error(err)
    rc, _, err = _cli("generate", "--artifacts", copy, "--classes", "1", "--out", tmp_path / "o", "--no-verify")
    assert rc == 0 and "--no-verify" in err


@pytest.mark.parametrize("opt,value", [("--temperature", "nan"), ("--cfg-scale", "nan"), ("--cfg-scale", "inf"),
                                       ("--top-p", "-inf"), ("--cfg-start", "nan"), ("--temperature", "1e400")])
def test_non_finite_settings_are_refused(tiny_artifacts, tmp_path, capsys, opt, value):
    assert main_exit(["generate", "--artifacts", str(tiny_artifacts), f"{opt}={value}", "--out", str(tmp_path / "o")]) == 2
    assert "finite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def main_exit(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


def test_bundled_model_is_recorded_as_bundled():
    from restok.cli.common import bundled_model

    if bundled_model() is None:
        pytest.skip("this install has no bundled model")
    from restok.cli import build_parser
    from restok.cli.common import resolve_models

    _, _, source = resolve_models(build_parser().parse_args(["export", "--out", "x"]))
    assert source == {"kind": "bundled", "model": "tiny"}


# --------------------------------------------------------------------------------- lost work


def test_reexport_keeps_what_restok_did_not_write_and_cleans_stale_partials(copy, tiny_tokenizer, tiny_generator):
    """One real re-export over an export (two claims, one export: each costs half a minute here): files restok
    did not write stay; the staging folder of a dead process is removed, a live process's is left alone."""
    from restok.export import ExportOptions, export_artifacts

    (copy / "engines" / "trt10.15").mkdir(parents=True)
    (copy / "engines" / "trt10.15" / "generator.plan").write_bytes(b"an engine built later")
    (copy / "polygraphy").mkdir()
    (copy / "polygraphy" / "generator_pass0_inputs.json").write_text("[]")
    (copy / "NOTES.md").write_text("mine")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = copy.parent / f".art.partial-{dead.pid}-abc"
    (stale / "generator").mkdir(parents=True)
    (stale / ".restok-partial").touch()
    (stale / "generator" / "weights.bin").write_bytes(b"half")
    live = copy.parent / f".art.partial-{os.getppid()}-def"  # a live process's staging folder is left alone
    live.mkdir()
    export_artifacts(tiny_tokenizer, tiny_generator, copy, ExportOptions(max_batch=2, encoder=False), progress=False)
    m = Manifest.read(copy)
    assert m.max_batch == 2 and "encoder" not in m.graphs and not (copy / "tokenizer" / "encoder.onnx").exists()
    assert (copy / "engines" / "trt10.15" / "generator.plan").read_bytes() == b"an engine built later"
    assert (copy / "polygraphy" / "generator_pass0_inputs.json").exists() and (copy / "NOTES.md").read_text() == "mine"
    assert not stale.exists() and live.exists()
    assert [p.name for p in copy.parent.glob(".art.*")] == [live.name]  # no staging folder of this export left


def test_generate_output_folder_is_consistent(tiny_artifacts, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["generate", "--artifacts", str(tiny_artifacts)]
    assert main(base + ["--classes", "1", "2", "3", "--out", str(out)]) == 0
    (out / "mine.txt").write_text("kept")
    assert main(base + ["--classes", "4", "--out", str(out)]) == 0  # a new run replaces the previous one's files
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_class4.png", "grid.png", "mine.txt", "summary.json", "tokens.npy"]
    assert json.loads((out / "summary.json").read_text())["classes"] == [4]
    # an empty path, the working folder, a folder of other files: refused before any work
    assert main_exit(base + ["--out", ""]) == 2
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    assert main(base + ["--out", str(foreign)]) == 2
    assert "not a restok generate run" in capsys.readouterr().err
    cwd = os.getcwd()
    try:
        os.chdir(out)
        assert main(base + ["--out", "."]) == 2
    finally:
        os.chdir(cwd)
    assert "working folder" in capsys.readouterr().err


def test_a_killed_generate_leaves_the_previous_run(tiny_artifacts, tmp_path):
    """SIGKILL while images are being written: the folder still holds the previous run, whole; the next run
    removes the dead process's staging folder."""
    out = tmp_path / "run"
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "1", "2", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    classes = [str(i % 10) for i in range(200)]
    p = subprocess.Popen([sys.executable, "-m", "restok", "generate", "--artifacts", str(tiny_artifacts), "--classes",
                          *classes, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        stages = list(tmp_path.glob(".run.partial-*"))
        if stages and len(list(stages[0].glob("*.png"))) > 20:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(tmp_path.glob(".run.partial-*")), "the run ended before it was killed"
    assert {q.name: q.read_bytes() for q in out.iterdir()} == before
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "3", "--out", str(out)]) == 0
    assert not list(tmp_path.glob(".run.partial-*"))


# ---------------------------------------------------------------------- OS errors, one line


def _tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_is_one_line_and_keeps_the_previous_output(tiny_artifacts, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "size=64k"):
        pytest.skip("cannot mount a small tmpfs here (needs root): disk-full path not exercised")
    try:
        rc, _, err = _cli("generate", "--artifacts", tiny_artifacts, "--classes", *range(10), "--out", disk / "run")
        assert rc == 3 and "no space left on the device" in err
        _one_line_error(err)
        assert not (disk / "run").exists() and not list(disk.glob(".run.partial-*"))
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_output_is_one_line(tiny_artifacts, tmp_path):
    ro = tmp_path / "ro"
    if not _tmpfs(ro, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        for args in (["generate", "--artifacts", tiny_artifacts, "--out", ro / "run"],
                     ["export", "--preset", "tiny", "--out", ro / "art"],
                     ["check", "--artifacts", tiny_artifacts, "--images", "1", "--polygraphy-dir", ro / "pg"]):
            rc, _, err = _cli(*args)
            assert rc == 3 and "read-only file system" in err and str(ro) in err, err[-1500:]
            _one_line_error(err)
    finally:
        subprocess.run(["umount", str(ro)])


def test_permission_denied_maps_to_one_line(tmp_path, capsys, monkeypatch):
    """Root ignores file modes, so the error is raised where the OS would raise it for another user."""
    import restok.fileutil as fu

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(fu, "check_writable", denied)
    assert main(["export", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 3
    err = capsys.readouterr().err
    assert "permission denied" in err and str(tmp_path / "x") in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,match", [
    (["extract-codes", "--tokenizer", "T", "--data", "digits", "--out", "o", "--shard-size", "0"], "must be >= 1"),
    (["extract-codes", "--tokenizer", "T", "--data", "digits", "--out", "o", "--batch", "0"], "must be >= 1"),
    (["check", "--images", "0"], "must be >= 1"),
    (["evaluate", "digits", "--per-class", "0"], "must be >= 1"),
    (["generate", "--threads", "-4", "--out", "o"], "must be >= 1"),
    (["export", "--out", ""], "the path is empty"),
    (["bench", "--runs", "0"], "must be >= 1"),
])
def test_bad_numbers_are_usage_errors(argv, match, capsys):
    assert main_exit(argv) == 2
    assert match in capsys.readouterr().err


def test_unreadable_images_are_bad_input(tmp_path, tiny_tokenizer):
    from restok.checkpoints import save_checkpoint

    save_checkpoint(tiny_tokenizer, tmp_path / "tok")
    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)
    (data / "fake.png").write_bytes(b"not a png at all")
    for args in (["evaluate", "tokenizer", "--tokenizer", tmp_path / "tok", "--data", f"folder:{tmp_path / 'data'}"],
                 ["extract-codes", "--tokenizer", tmp_path / "tok", "--data", f"folder:{tmp_path / 'data'}",
                  "--out", tmp_path / "codes", "--crops", "center"]):
        rc, _, err = _cli(*args)
        assert rc == 2 and "fake.png is not a readable image" in err, err[-1500:]
        _one_line_error(err)


def test_cuda_without_a_gpu(tiny_artifacts, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = _cli("generate", "--artifacts", tiny_artifacts, "--backend", "torch", "--device", "cuda",
                      "--out", tmp_path / "o")
    assert rc == 2 and "no CUDA device" in err
    _one_line_error(err)
