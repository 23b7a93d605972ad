"""The offline sampling job, restok sample (restok.jobs.sample): sharded, split with --shard, resumable after
SIGKILL, image for image what restok generate draws."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from restok.cli import main
from tests.support.cli import ENV


def test_sample_job_shards_resume_and_split(tiny_artifacts, tmp_path):
    """In-process, split in two with --shard, and killed half way then resumed: the same samples.npz."""
    base = ["sample", "--artifacts", str(tiny_artifacts), "--classes", "1", "2", "3", "--per-class", "8",
            "--shard-size", "4", "--seed", "5"]
    assert main(base + ["--out", str(tmp_path / "one")]) == 0
    ref = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    index = json.loads((tmp_path / "one" / "samples.json").read_text())
    assert ref.shape == (24, 32, 32, 3) and ref.dtype == np.uint8
    assert [(d["class"], d["index"], d["seed"]) for d in index["index"][:9:8]] == [(1, 0, 5), (2, 8, 5)]
    # image 10 equals restok generate's image for the same seed and index
    from restok.images import to_uint8
    from restok.runtime import Pipeline

    g = Pipeline(tiny_artifacts).generate([2], seed=5, noise_start=10)
    assert np.array_equal(to_uint8(g.images)[0], ref[10])
    split = tmp_path / "split"
    assert main(base + ["--out", str(split), "--shard", "1/2"]) == 0
    assert not (split / "samples.npz").exists()  # half the shards: nothing assembled yet
    assert main(base + ["--out", str(split), "--shard", "0/2"]) == 0
    assert np.array_equal(np.load(split / "samples.npz")["arr_0"], ref)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "restok", *base, "--out", str(killed)]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(list((killed / "shards").glob("*.npz"))) < 2:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(list((killed / "shards").glob("*.npz")))
    assert 0 < done < 6 and not (killed / "samples.npz").exists()
    assert main(base + ["--out", str(killed), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["already_done"] == done
    assert np.array_equal(np.load(killed / "samples.npz")["arr_0"], ref)
    with pytest.raises(SystemExit):
        main(base[:-1] + ["6", "--out", str(killed), "--shard", "2/2"])
    assert main(base[:-1] + ["6", "--out", str(killed)]) == 2  # another job's folder: refused
