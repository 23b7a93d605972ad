"""restok.fileutil: a swap interrupted between its two renames (where renameat2 is missing) is repaired by the
next write to the path."""

import os
import subprocess
import sys


def test_the_two_rename_fallback_is_repaired(tmp_path):
    """Where renameat2(RENAME_EXCHANGE) is missing, a swap is two renames; a crash between them leaves the old
    folder at .NAME.old-PID, and the next write to the path puts it back before anything else."""
    from restok.fileutil import staged

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(out, tmp_path / f".out.old-{dead.pid}")  # the state a crash between the two renames leaves
    with staged(out, owned=lambda d: ["a.txt"]) as st:
        assert (out / "a.txt").read_text() == "old"  # repaired before the new output is built
        (st / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and not list(tmp_path.glob(".out.*"))
