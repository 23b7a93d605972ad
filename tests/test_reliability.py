"""No silent wrong result, no lost work, no raw traceback: each case of the reliability issue, on real files
and real processes (the CLI in a subprocess where a traceback could leak)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from restok.cli import main
from restok.manifest import ArtifactError, Manifest
from restok.runtime import Pipeline, SamplingParams

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def _cli(*args, env=None, timeout=600):
    """The CLI in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "restok", *map(str, args)], capture_output=True, text=True,
                       env={**ENV, **(env or {})}, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _one_line_error(err: str) -> None:
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-2000:]


@pytest.fixture
def copy(tiny_artifacts, tmp_path):
    d = tmp_path / "art"
    shutil.copytree(tiny_artifacts, d, copy_function=shutil.copy2)  # like cp -a: mtimes kept
    return d


# ------------------------------------------------------------------------- silent wrong results


def test_a_flipped_byte_is_caught_even_with_its_mtime_kept(copy, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    Manifest.read(copy)  # verified once: remembered for this user
    w = copy / "generator" / "weights.bin"
    st = w.stat()
    b = bytearray(w.read_bytes())
    b[len(b) // 2] ^= 0x01
    w.write_bytes(bytes(b))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before
    with pytest.raises(ArtifactError, match=r"weights\.bin does not match the sha256"):
        Manifest.read(copy)
    # nothing travels with the folder: a verified export copied elsewhere is verified again there
    assert not any(p.name.startswith(".restok") for p in copy.iterdir())


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


@pytest.mark.parametrize("kw,match", [(dict(temperature=float("nan")), "temperature must be a finite"),
                                      (dict(cfg_scale=float("inf")), "cfg_scale must be a finite"),
                                      (dict(cfg_scale=1e300), r"cfg_scale must be a finite number in \[0, 100\]"),
                                      (dict(top_p=1.5), r"top_p must be a finite number in \[0, 1\]"),
                                      (dict(top_k=-1), r"top_k must be an integer in \[0, 2147483647\]"),
                                      (dict(top_k=2.5), "top_k must be an integer"),
                                      (dict(top_k=2**63), "top_k must be an integer"),
                                      (dict(cfg_schedule="sigmoid"), "cfg_schedule must be one of"),
                                      (dict(temperature="1"), "temperature must be a finite number"),
                                      (dict(cfg_start=2.0), r"cfg_start must be a finite number in")])
def test_sampling_params_validate(kw, match):
    """The torch-free validation every entry point shares (CLI, Pipeline, restok.generate)."""
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_encode_checks_dtype_and_range(tiny_artifacts):
    p = Pipeline(tiny_artifacts)
    x = np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float32)
    assert p.encode(x).shape == (2, 128)
    with pytest.raises(ValueError, match="divide uint8 pixels by 255"):
        p.encode((x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="divide uint8 pixels by 255"):  # in range, but integers: the dtype says
        p.encode((x > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        p.encode(x * 255)
    with pytest.raises(ValueError, match=r"shape \[1\.\.4, 3, 32, 32\]"):
        p.encode(x[:, :, :16])


# ------------------------------------------------------------------ parity when files move


def test_check_from_another_place_with_moved_checkpoints(tmp_path, tiny_tokenizer, tiny_generator, monkeypatch):
    """An export records its checkpoints by their weights' sha256: moved checkpoints are named explicitly,
    and verified; the bundled model is recorded as bundled (it works from any clone)."""
    from restok.checkpoints import save_checkpoint

    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "ck"
    save_checkpoint(tiny_tokenizer, ck / "tokenizer")
    save_checkpoint(tiny_generator, ck / "generator")
    art = tmp_path / "art"
    assert main(["export", "--checkpoint", str(ck), "--max-batch", "2", "--out", str(art)]) == 0
    moved = tmp_path / "elsewhere"
    shutil.move(str(ck), str(moved))
    shipped = tmp_path / "shipped"  # CI's build job -> check job
    shutil.copytree(art, shipped)
    rc, _, err = _cli("check", "--artifacts", shipped, "--images", "1", "--polygraphy-dir", tmp_path / "pg")
    assert rc == 2 and "--tokenizer/--generator" in err
    _one_line_error(err)
    rc, _, err = _cli("check", "--artifacts", shipped, "--images", "1", "--polygraphy-dir", tmp_path / "pg",
                      "--tokenizer", moved / "tokenizer", "--generator", moved / "generator")
    assert rc == 0, err[-2000:]
    other = tmp_path / "other"
    save_checkpoint(tiny_tokenizer, other / "tokenizer")
    from restok.models.presets import build_generator

    save_checkpoint(build_generator("tiny", seed=99), other / "generator")
    rc, _, err = _cli("check", "--artifacts", shipped, "--images", "1", "--checkpoint", other,
                      "--polygraphy-dir", tmp_path / "pg")
    assert rc == 2 and "not the ones these artifacts were exported from" in err


def test_bundled_model_is_recorded_as_bundled():
    from restok.cli.common import bundled_model

    if bundled_model() is None:
        pytest.skip("this install has no bundled model")
    from restok.cli import build_parser
    from restok.cli.common import resolve_models

    _, _, source = resolve_models(build_parser().parse_args(["export", "--out", "x"]))
    assert source == {"kind": "bundled", "model": "tiny"}


# --------------------------------------------------------------------------------- lost work


def test_reexport_keeps_what_restok_did_not_write(copy, tiny_tokenizer, tiny_generator):
    from restok.export import ExportOptions, export_artifacts

    (copy / "engines" / "trt10.15").mkdir(parents=True)
    (copy / "engines" / "trt10.15" / "generator.plan").write_bytes(b"an engine built later")
    (copy / "polygraphy").mkdir()
    (copy / "polygraphy" / "generator_pass0_inputs.json").write_text("[]")
    (copy / "NOTES.md").write_text("mine")
    export_artifacts(tiny_tokenizer, tiny_generator, copy, ExportOptions(max_batch=2, encoder=False), progress=False)
    m = Manifest.read(copy)
    assert m.max_batch == 2 and "encoder" not in m.graphs and not (copy / "tokenizer" / "encoder.onnx").exists()
    assert (copy / "engines" / "trt10.15" / "generator.plan").read_bytes() == b"an engine built later"
    assert (copy / "polygraphy" / "generator_pass0_inputs.json").exists() and (copy / "NOTES.md").read_text() == "mine"
    assert not list(copy.parent.glob(".art.*"))  # no staging folder left


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


def test_first_use_exports_once(tmp_path):
    """Two generate runs that both need the model exported into the cache: one exports, the other waits."""
    env = {"RESTOK_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "restok", "generate", "--preset", "tiny", "--max-batch", "2", "--classes", "1"]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"o{i}")], env={**ENV, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert sum(e.count("exporting the model into") for e in errs) == 1
    assert np.array_equal(np.load(tmp_path / "o0" / "tokens.npy"), np.load(tmp_path / "o1" / "tokens.npy"))


def test_stale_partials_of_dead_processes_are_cleaned(copy, tiny_tokenizer, tiny_generator):
    from restok.export import ExportOptions, export_artifacts

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = copy.parent / f".art.partial-{dead.pid}-abc"
    (stale / "generator").mkdir(parents=True)
    (stale / ".restok-partial").touch()
    (stale / "generator" / "weights.bin").write_bytes(b"half")
    live = copy.parent / f".art.partial-{os.getppid()}-def"  # a live process's staging folder is left alone
    live.mkdir()
    export_artifacts(tiny_tokenizer, tiny_generator, copy, ExportOptions(max_batch=2, encoder=False), progress=False)
    assert not stale.exists() and live.exists()


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


def test_an_edited_manifest_is_refused(copy):
    """manifest.json is what every other file is checked against: a value changed by hand (still valid JSON,
    every file still matching) is refused, not run with a wrong configuration."""
    mp = copy / "manifest.json"
    d = json.loads(mp.read_text())
    d["generator"]["num_classes"] = 11
    mp.write_text(json.dumps(d, indent=2))
    with pytest.raises(ArtifactError, match="modified after the export wrote it"):
        Manifest.read(copy)
