"""restok sample's shard files without a model (synthetic shards): every damaged shard is found and redone,
--merge joins the folders of --shard runs into the same bytes as one run, and in about one shard of memory."""

import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from restok.cli import main
from restok.jobs.sample import SAMPLES, SampleJob, assemble, merge, prepare, write_shard
from tests.support.cli import ENV, one_line_error


def synthetic_job(out, seed=0, classes=(0, 1, 2), per_class=5, shard_size=4) -> SampleJob:
    """A job that never opens its export: the artifacts' content hash is given."""
    job = SampleJob("synthetic", str(out), list(classes), per_class, seed, shard_size=shard_size,
                    artifacts_sha256="a" * 64)
    prepare(job)
    return job


def shard_images(job, s, size=32) -> np.ndarray:
    """Shard s's images: the same for the same (seed, shard) whichever folder holds it."""
    return np.random.default_rng([job.seed, s]).integers(0, 256, (len(job.shard_range(s)), size, size, 3), np.uint8)


def fill(job, shards=None, size=32) -> None:
    for s in range(job.num_shards) if shards is None else shards:
        write_shard(job, s, shard_images(job, s, size))


def forge(job, s, images, labels, indices) -> None:
    """Shard s holding these arrays, with a record that matches its bytes (a writer's bug, not a torn file)."""
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=np.asarray(labels), indices=np.asarray(indices))
    data = buf.getvalue()
    rng = job.shard_range(s)
    rec = {"job": job.job_sha256, "shard": s, "start": rng.start, "count": len(rng), "image_size": images.shape[1],
           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    job.record_path(s).write_text(json.dumps(rec))
    job.shard_path(s).write_bytes(data)


def _damage(job, s, how) -> None:
    rng, images = job.shard_range(s), shard_images(job, s)
    labels, path = job.shard_labels(s), job.shard_path(s)
    if how == "fewer images":
        forge(job, s, images[:-1], labels[:-1], list(rng)[:-1])
    elif how == "wrong indices":
        forge(job, s, images, labels, [i + 1 for i in rng])
    elif how == "wrong labels":
        forge(job, s, images, [c + 1 for c in labels], list(rng))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "a changed pixel":  # the zip stays valid: only the record's sha256 tells
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif how == "not a zip":
        forge(job, s, images, labels, list(rng))
        data = b"\0" * path.stat().st_size
        rec = json.loads(job.record_path(s).read_text())
        job.record_path(s).write_text(json.dumps({**rec, "sha256": hashlib.sha256(data).hexdigest()}))
        path.write_bytes(data)
    elif how == "no record":
        job.record_path(s).unlink()
    elif how == "another job's":
        other = SampleJob("synthetic", job.out, job.classes, job.per_class, job.seed + 1, shard_size=job.shard_size,
                          artifacts_sha256="a" * 64)
        write_shard(other, s, images)


DAMAGES = ["fewer images", "wrong indices", "wrong labels", "truncated", "empty", "a changed pixel", "not a zip",
           "no record", "another job's"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_shard_is_missing_until_redone(tmp_path, capsys, how):
    job = synthetic_job(tmp_path / "job")
    fill(job)
    _damage(job, 1, how)
    capsys.readouterr()
    assert job.pending() == [1] and job.pending() == [1]
    err = capsys.readouterr().err
    assert err.count("restok: shard 1 is damaged (") == 1 and err.rstrip().endswith("; redoing it"), err  # once
    assert assemble(job) is None and not (tmp_path / "job" / SAMPLES).exists()  # only verified shards are used
    fill(job, [1])
    assert job.pending() == []
    want = np.concatenate([shard_images(job, s) for s in range(job.num_shards)])
    assert np.array_equal(np.load(assemble(job))["arr_0"], want)


def test_assemble_and_merge_write_the_same_bytes(tmp_path):
    whole = synthetic_job(tmp_path / "whole")
    fill(whole)
    halves = [synthetic_job(tmp_path / f"half{i}") for i in (0, 1)]
    for s in range(whole.num_shards):
        fill(halves[s % 2], [s])
    ref = assemble(whole)
    path, job = merge([h.out for h in halves], tmp_path / "merged")
    assert path.read_bytes() == ref.read_bytes()
    arr = np.load(path)["arr_0"]
    assert arr.shape == (15, 32, 32, 3)
    assert np.array_equal(arr, np.concatenate([shard_images(job, s) for s in range(4)]))
    assert json.loads((tmp_path / "merged" / "samples.json").read_text())["index"][5] == {"index": 5, "class": 1,
                                                                                         "seed": 0}


def _sample(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["sample", *map(str, args)])
    return rc, capsys.readouterr().err


def test_merge_refuses_missing_shards_other_jobs_and_run_options(tmp_path, capsys):
    a, b = synthetic_job(tmp_path / "a", shard_size=2), synthetic_job(tmp_path / "b", shard_size=2)
    fill(a, [0, 2, 4, 6])
    fill(b, [1, 3])
    _damage(b, 3, "truncated")
    rc, err = _sample(capsys, "--merge", a.out, b.out, "--out", tmp_path / "m")
    assert rc == 2 and "shard(s) 3, 5, 7 of 8 are missing or damaged" in err, err
    one_line_error(err)
    assert "restok: shard 3 is damaged (" in err and not (tmp_path / "m" / SAMPLES).exists()
    other = synthetic_job(tmp_path / "other", seed=9, shard_size=2)
    rc, err = _sample(capsys, "--merge", a.out, other.out, "--out", tmp_path / "m")
    assert rc == 2 and f"{other.out} holds another sampling job than {a.out} (different seed)" in err, err
    one_line_error(err)
    (tmp_path / "empty").mkdir()
    rc, err = _sample(capsys, "--merge", a.out, tmp_path / "empty", "--out", tmp_path / "m")
    assert rc == 2 and f"{tmp_path / 'empty'} has no job.json" in err, err
    rc, err = _sample(capsys, "--out", tmp_path / "x")
    assert rc == 2 and "--per-class is required" in err
    fill(b, [3, 5, 7])
    for extra in (["--shard", "0/2"], ["--ray"], ["--artifacts", "x"], ["--seed", "3"], ["--per-class", "2"]):
        rc, err = _sample(capsys, "--merge", a.out, b.out, "--out", tmp_path / "m", *extra)
        assert rc == 2 and "--merge" in err, extra
        one_line_error(err)
    assert not (tmp_path / "m" / SAMPLES).exists()
    rc, err = _sample(capsys, "--merge", a.out, b.out, "--out", tmp_path / "m")
    assert rc == 0, err
    assert main(["sample", "--merge", a.out, other.out, "--out", str(tmp_path / "m")]) == 2  # the other job's folder


MEASURE = """
import re, sys
from restok.jobs.sample import merge

def kib(key):  # this process's own memory (getrusage's ru_maxrss also counts the parent's, from before the exec)
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

before = kib("VmHWM")
try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kib("VmRSS")
except OSError:
    pass
merge(sys.argv[1:-1], sys.argv[-1])
print(before, kib("VmHWM"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_merge_streams_in_about_one_shard_of_memory(tmp_path):
    """The peak memory of a merge of 4,000 64x64 images (47 MiB in 8 shards of 6 MiB, in two folders) grows
    by far less than the image data: joining them in memory took about 3x it."""
    halves = [synthetic_job(tmp_path / f"half{i}", classes=range(40), per_class=100, shard_size=500) for i in (0, 1)]
    for s in range(halves[0].num_shards):
        fill(halves[s % 2], [s], size=64)
    data = 4000 * 64 * 64 * 3
    p = subprocess.run([sys.executable, "-c", MEASURE, *(h.out for h in halves), str(tmp_path / "m")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    before, peak = map(int, p.stdout.split())
    print(f"merge of {data / 2**20:.0f} MiB of images: RSS {before / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    assert peak - before < data, (before, peak)
    assert (tmp_path / "m" / SAMPLES).stat().st_size > data
