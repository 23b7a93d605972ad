"""Where outputs go (reliability issue, third round): links as output paths, outputs that would overwrite an
export's files, --json targets checked before any work, SIGTERM handled like Ctrl-C, paths a terminal
cannot show, and the exit code of every kind of bad input."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from restok.cli import main
from tests.support.cli import ENV, one_line_error, run_cli

# ------------------------------------------------------------------------------ links


def test_an_output_link_is_written_through(tiny_artifacts, tmp_path):
    """--out LINK writes into the link's target, keeps the link, and leaves nothing hidden beside it; a rerun
    replaces the run inside the target."""
    target, link = tmp_path / "target", tmp_path / "L"
    target.mkdir()
    link.symlink_to(target)
    for classes in (["1", "2"], ["3"]):
        assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", *classes, "--out", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    summary = json.loads((target / "summary.json").read_text())
    assert summary["classes"] == [3] and (target / "0000_class3.png").is_file()
    assert not (target / "0001_class2.png").exists()  # the previous run's image was replaced, not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L", "target"]


def test_cleanup_never_follows_a_link(tmp_path):
    """A link at a staging name (left by an older restok) is removed itself; the folder it points to keeps every
    file."""
    from restok.fileutil import staged

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    user = tmp_path / "photos"
    user.mkdir()
    (user / "mine.jpg").write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.symlink_to(user)
    with staged(tmp_path / "out") as st:
        (st / "a.txt").write_text("new")
    assert (user / "mine.jpg").read_bytes() == b"precious" and not stale.exists() and not stale.is_symlink()
    assert (tmp_path / "out" / "a.txt").read_text() == "new"


def test_a_file_link_is_written_through(tmp_path):
    from restok.fileutil import atomic_write_bytes

    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    atomic_write_bytes(tmp_path / "link.json", b"new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


# ------------------------------------------------------------------------------ --json, checked first


def test_json_never_overwrites_an_export_file(copy, tmp_path, capsys):
    before = (copy / "manifest.json").read_bytes()
    for where in (copy / "manifest.json", copy / "generator" / "weights.bin"):
        rc = main(["generate", "--artifacts", str(copy), "--classes", "1", "--out", str(tmp_path / "o"),
                   "--json", str(where)])
        assert rc == 2 and "would overwrite a file of the restok export" in capsys.readouterr().err
    assert (copy / "manifest.json").read_bytes() == before and not (tmp_path / "o").exists()
    # a file of the user's own beside the export is theirs to overwrite
    assert main(["generate", "--artifacts", str(copy), "--classes", "1", "--out", str(tmp_path / "o"),
                 "--json", str(copy / "notes.json")]) == 0
    assert json.loads((copy / "notes.json").read_text())["classes"] == [1]


@pytest.mark.parametrize("where", ["/proc/restok.json", "{out}", "{tmp}"])
def test_json_target_is_checked_before_any_work(tiny_artifacts, tmp_path, capsys, where):
    out = tmp_path / "o"
    rc = main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "1", "--out", str(out),
               "--json", where.format(out=out, tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    one_line_error(err)


def test_json_into_a_new_folder_is_made(tiny_artifacts, tmp_path):
    where = tmp_path / "reports" / "deep" / "run.json"
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "1", "--out", str(tmp_path / "o"),
                 "--json", str(where)]) == 0
    assert json.loads(where.read_text())["classes"] == [1]


# ------------------------------------------------------------------------------ signals and encodings


def test_sigterm_unwinds_like_ctrl_c(tiny_artifacts, tmp_path):
    """SIGTERM mid-run: exit 143 with one line, the staging folder removed, the previous run intact."""
    out = tmp_path / "run"
    assert main(["generate", "--artifacts", str(tiny_artifacts), "--classes", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    classes = [str(i % 10) for i in range(400)]
    p = subprocess.Popen([sys.executable, "-m", "restok", "generate", "--artifacts", str(tiny_artifacts), "--classes",
                          *classes, "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        stages = list(tmp_path.glob(".run.partial-*"))
        if stages and list(stages[0].glob("*.png")):
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".run.partial-*"))
    assert {q.name: q.read_bytes() for q in out.iterdir()} == before


def test_paths_the_terminal_cannot_show(tiny_artifacts, tmp_path):
    """An ASCII-only stdout gets the path escaped (exit 0, files written); a path that is not UTF-8 is refused
    before any work."""
    out = tmp_path / "café"
    rc, so, err = run_cli("generate", "--artifacts", tiny_artifacts, "--classes", "1", "--out", out,
                          env={"PYTHONIOENCODING": "ascii"})
    assert rc == 0 and (out / "grid.png").is_file() and "caf\\xe9" in so, err
    bad = os.fsdecode(bytes(tmp_path) + b"/\xff")
    p = subprocess.run([sys.executable, "-m", "restok", "generate", "--artifacts", str(tiny_artifacts), "--classes",
                        "1", "--out", bad], env=ENV, capture_output=True)
    assert p.returncode == 2 and b"not UTF-8" in p.stderr and not os.path.exists(bad)


# ------------------------------------------------------------------------------ exit codes


def test_bad_data_and_unreachable_servers_have_their_exit_codes(tmp_path):
    """Bad files and bad URLs are bad input (2); a server that does not answer is the environment (3)."""
    import httpx
    from PIL import Image

    from restok.cli import _classify

    assert _classify(zipfile.BadZipFile("File is not a zip file"))[0] == 2
    assert _classify(EOFError())[0] == 2
    assert _classify(Image.DecompressionBombError("too many pixels"))[0] == 2
    assert _classify(httpx.UnsupportedProtocol("ftp"))[0] == 2
    assert _classify(httpx.ConnectError("refused"))[0] == 3
    assert _classify(RuntimeError("boom"))[0] == 70
    with socket_on_free_port() as port:
        pass  # closed: nothing listens there now
    rc, _, err = run_cli("loadtest", "--url", f"http://127.0.0.1:{port}", "--requests", "1", timeout=120)
    assert rc == 3 and "reachable" in err, err
    one_line_error(err)
    rc, _, err = run_cli("loadtest", "--url", "ftp://127.0.0.1:1", "--requests", "1", timeout=120)
    assert rc == 2, err
    one_line_error(err)


def socket_on_free_port():
    import contextlib
    import socket

    @contextlib.contextmanager
    def bound():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        try:
            yield s.getsockname()[1]
        finally:
            s.close()

    return bound()
