"""The offline sampling job, restok sample (restok.jobs.sample): sharded, split with --shard, resumable after
SIGKILL, image for image what restok generate draws; job.json claimed under a lock and compared by content,
damaged shards redone, --merge of shard folders byte for byte the whole run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_two_jobs_started_into_one_new_folder_cannot_both_claim_it(tiny_artifacts, tmp_path, monkeypatch):
    """job.json is checked and written under the folder's lock: of two jobs (other seeds) started at once into
    one new folder, one claims it and the other is refused; the check compares the whole identity."""
    import threading

    from restok.jobs import sample

    write, both_checked = sample.atomic_write_bytes, threading.Barrier(2, timeout=2)

    def write_when_both_checked(path, data):  # without the lock, both find the folder free before either writes
        if Path(path).name == sample.SPEC:
            try:
                both_checked.wait()
            except threading.BrokenBarrierError:
                pass
        return write(path, data)

    monkeypatch.setattr(sample, "atomic_write_bytes", write_when_both_checked)
    jobs = [sample.SampleJob(str(tiny_artifacts), str(tmp_path / "out"), [0], 4, seed, shard_size=2) for seed in (1, 2)]
    refused = []

    def start(job):
        try:
            sample.prepare(job)
        except ValueError as e:
            refused.append((job.seed, str(e)))

    threads = [threading.Thread(target=start, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refused) == 1 and "(different seed); choose another --out" in refused[0][1], refused
    assert json.loads((tmp_path / "out" / "job.json").read_text())["seed"] == 3 - refused[0][0]
    monkeypatch.undo()
    job = sample.SampleJob(str(tiny_artifacts), str(tmp_path / "full"), [0], 4, 1, shard_size=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "job.json").write_text(json.dumps({**job.spec(), "image_size": 64}))
    with pytest.raises(ValueError, match=r"\(different image_size\)"):  # a key this job lacks differs too
        sample.prepare(job)


def _reexport_with_other_weights(folder) -> None:
    """What re-exporting another model to the same folder does: other weights, a manifest with their sha256."""
    from restok.manifest import Manifest

    m = Manifest.read(folder, verify=False)
    w = folder / "generator" / "weights.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2 & ~3] ^= 1  # the lowest mantissa bit of one float32
    w.write_bytes(bytes(data))
    m.write(folder)


def test_a_job_is_the_exports_content_not_its_path(copy, tmp_path, capsys):
    """The same export through a symlink is the same job; a re-export between two --shard runs is another one."""
    from tests.support.cli import one_line_error

    link = tmp_path / "link"
    link.symlink_to(copy)
    base = ["sample", "--classes", "1", "--per-class", "2", "--shard-size", "1", "--seed", "4"]
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    assert main(base + ["--artifacts", str(copy), "--out", same, "--shard", "0/2"]) == 0
    assert main(base + ["--artifacts", str(link), "--out", same, "--shard", "1/2"]) == 0
    assert np.load(tmp_path / "same" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)
    assert main(base + ["--artifacts", str(copy), "--out", other, "--shard", "0/2"]) == 0
    from restok.jobs.sample import SampleJob, run_local

    started = SampleJob(str(copy), str(tmp_path / "started"), [1], 1)
    _reexport_with_other_weights(copy)
    with pytest.raises(ValueError, match="changed while the job started"):  # checked again when the model opens
        run_local(started, progress=False)
    capsys.readouterr()
    assert main(base + ["--artifacts", str(copy), "--out", other, "--shard", "1/2"]) == 2
    err = capsys.readouterr().err
    one_line_error(err)
    assert "re-exported or another model" in err and "choose another --out" in err, err
    assert len(list((tmp_path / "other" / "shards").glob("*.npz"))) == 1  # nothing of the other model's was written


def test_damaged_shards_are_redone_not_trusted(tiny_artifacts, tmp_path, capsys):
    """A truncated, an empty and a short shard (1 image of 2, with a record that matches its bytes) are said
    on stderr once each, redone, and the job ends with the same samples.npz (never exit 70)."""
    import hashlib
    import io

    out = tmp_path / "job"
    base = ["sample", "--artifacts", str(tiny_artifacts), "--classes", "1", "2", "3", "--per-class", "2",
            "--shard-size", "2", "--seed", "7", "--out", str(out)]
    assert main(base) == 0
    ref = (out / "samples.npz").read_bytes()
    shard = [out / "shards" / f"shard_{s:05d}.npz" for s in range(3)]
    shard[0].write_bytes(shard[0].read_bytes()[:-100])
    shard[1].write_bytes(b"")
    buf = io.BytesIO()
    with np.load(shard[2]) as z:
        np.savez(buf, **{k: z[k][:1] for k in ("images", "labels", "indices")})
    shard[2].write_bytes(buf.getvalue())
    record = shard[2].with_suffix(".json")  # made to match the short shard's bytes: its count is what tells
    if record.is_file():  # (restok before shard records wrote none)
        record.write_text(json.dumps({**json.loads(record.read_text()), "bytes": len(buf.getvalue()),
                                      "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}))
    capsys.readouterr()
    assert main(base + ["--json", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    for s in range(3):
        assert err.count(f"restok: shard {s} is damaged (") == 1, err
    assert "truncated or modified" in err and "1 images where its range 4-5 has 2" in err
    assert json.loads((tmp_path / "r.json").read_text())["done_now"] == 3
    assert (out / "samples.npz").read_bytes() == ref


def test_merge_of_shard_folders_is_the_whole_run_byte_for_byte(tiny_artifacts, tmp_path):
    """--shard 0/2 and 1/2 written to two folders, then --merge: the samples.npz of one whole run."""
    base = ["sample", "--artifacts", str(tiny_artifacts), "--classes", "1", "2", "--per-class", "2",
            "--shard-size", "1", "--seed", "3"]
    whole, a, b, merged = (str(tmp_path / d) for d in ("whole", "a", "b", "merged"))
    assert main(base + ["--out", whole]) == 0
    assert main(base + ["--out", a, "--shard", "0/2"]) == 0
    assert main(base + ["--out", b, "--shard", "1/2"]) == 0
    assert not (tmp_path / "a" / "samples.npz").exists()
    ref = Path(whole)
    for out in (merged, a):  # into a new folder, or into one of the shard folders
        assert main(["sample", "--merge", a, b, "--out", out]) == 0
        out = Path(out)
        assert (out / "samples.npz").read_bytes() == (ref / "samples.npz").read_bytes()
        assert np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(ref / "samples.npz")["arr_0"])
        assert json.loads((out / "samples.json").read_text()) == json.loads((ref / "samples.json").read_text())
