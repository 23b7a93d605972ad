"""``restok sample``: large offline sampling jobs (e.g. 50 images per class x 1,000 classes for gFID), written
in resumable shards and assembled into the ADM evaluator's ``samples.npz`` (uint8 [N, S, S, 3] under
``arr_0``) with an index (class, seed, index per image).

Image i of a job is class ``labels[i]`` drawn with noise stream (seed, i): whichever way the job runs —
in-process, split by ``--shard i/N`` across a Slurm array or Kubernetes jobs (into one folder, or into one
folder each, joined by ``--merge``), or as a Ray Data job with one backend per actor — the same seed gives
the same images.

A job is its content, not its paths: the export's content hash (``manifest_identity``: the sha256 its
manifest records for each file and the graph fields), the sampling settings, seed, classes, per-class count
and shard size. ``job.json`` records it (checked or written under the folder's lock, so two jobs started into
one folder cannot both claim it); a re-exported model or other settings are refused, the same export through
another path is the same job.

A shard is trusted only once verified: each ``shards/shard_NNNNN.npz`` has a sidecar record
``shard_NNNNN.json`` (written first, then the shard, each whole under a temporary name) with the job's hash,
the shard's range, its image count and size, and the shard file's byte count and sha256. A shard whose file
does not match its record, or whose images, labels or indices do not match its range, counts as missing
and is redone (said once on stderr). samples.npz is streamed shard by shard (memory: about one shard)
with fixed zip timestamps, so the same shards give the same bytes however the job was split.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Iterator

import numpy as np

from restok.fileutil import atomic_path, atomic_write_bytes, locked
from restok.sampling_params import SamplingParams

if TYPE_CHECKING:
    from restok.manifest import Manifest

SPEC, INDEX, SAMPLES = "job.json", "samples.json", "samples.npz"
_INFO = ("artifacts", "job_sha256")  # in job.json for people, not part of the job's identity
_NOT_IMAGES = ("schema", "content_sha256", "created", "source", "tools", "files")  # manifest fields no image depends on
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every zip member's timestamp: the same arrays give the same bytes
_CHUNK = 1 << 22  # bytes per write while streaming samples.npz
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError, OSError, zlib.error)


def _sha256_json(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def manifest_identity(m: Manifest) -> str:
    """The export's content hash: the sha256 the manifest records for each file plus the fields that shape
    the graphs (not its path, creation time or tool versions); the files themselves are not rehashed."""
    d = m.to_dict()
    body = {k: v for k, v in d.items() if k not in _NOT_IMAGES}
    body["files"] = {rel: info.get("sha256") for rel, info in m.files.items()}
    return _sha256_json(body)


def artifacts_identity(folder: str | os.PathLike) -> str:
    from restok.manifest import Manifest

    return manifest_identity(Manifest.read(folder, verify=False))


@dataclass
class SampleJob:
    artifacts: str
    out: str
    classes: list[int]
    per_class: int
    seed: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    shard_size: int = 1000
    backend: str = "onnxruntime"
    threads: int | None = None
    artifacts_sha256: str = ""  # manifest_identity of the export; read from its manifest when not given

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.shard_size < 1 or not self.classes:
            raise ValueError("--per-class and --shard-size must be >= 1 and at least one class is needed")
        self.sampling.validate()
        if not self.artifacts_sha256:
            self.artifacts_sha256 = artifacts_identity(self.artifacts)

    @classmethod
    def from_spec(cls, doc: dict, out: str | os.PathLike, where: Path | None = None) -> SampleJob:
        """The job a job.json describes, writing into ``out``."""
        try:
            return cls(str(doc.get("artifacts", "")), str(out), [int(c) for c in doc["classes"]], int(doc["per_class"]),
                       int(doc["seed"]), SamplingParams(**doc["sampling"]), int(doc["shard_size"]),
                       artifacts_sha256=str(doc["artifacts_sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where or SPEC} is incomplete or from an older restok ({type(e).__name__}: {e}); "
                             "rerun that job into a new folder") from e

    @property
    def labels(self) -> list[int]:
        return [c for c in self.classes for _ in range(self.per_class)]

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.classes) * self.per_class / self.shard_size)

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min(len(self.classes) * self.per_class, (s + 1) * self.shard_size))

    def shard_labels(self, s: int) -> list[int]:
        return [self.classes[i // self.per_class] for i in self.shard_range(s)]

    def shard_path(self, s: int) -> Path:
        return Path(self.out) / "shards" / f"shard_{s:05d}.npz"

    def record_path(self, s: int) -> Path:
        return self.shard_path(s).with_suffix(".json")

    def pending(self, note: str = "redoing it") -> list[int]:
        """Shards not yet there and verified (a damaged one is said on stderr, once, and counts as missing)."""
        return [s for s in range(self.num_shards) if not shard_ok(self, s, note)]

    def identity(self) -> dict:
        """What makes the images (the export's content, not its path): a rerun into the same folder, and
        every folder of a merge, must match it."""
        return {"artifacts_sha256": self.artifacts_sha256, "classes": [int(c) for c in self.classes],
                "per_class": self.per_class, "seed": self.seed, "sampling": self.sampling.to_dict(),
                "shard_size": self.shard_size}

    @property
    def job_sha256(self) -> str:
        return _sha256_json(self.identity())

    def spec(self) -> dict:
        """job.json: the identity, its hash, and the artifacts path it was started with (information only)."""
        return {**self.identity(), "job_sha256": self.job_sha256, "artifacts": self.artifacts}


# ------------------------------------------------------------------------------ job.json


def read_spec(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); choose another --out") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a sampling job's {SPEC}; choose another --out")
    return doc


def difference(job: SampleJob, have: dict) -> str | None:
    """What a job.json's identity has other than ``job``'s (None when it is the same job)."""
    want = job.identity()
    got = {k: v for k, v in have.items() if k not in _INFO}
    keys = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
    if not keys:
        return None
    parts = [k for k in keys if k != "artifacts_sha256"]
    if "artifacts_sha256" in keys and not got.get("artifacts_sha256"):
        parts.insert(0, "artifacts content (none recorded there: an older restok)")
    elif "artifacts_sha256" in keys:
        parts.insert(0, f"artifacts content (sha256 {str(got['artifacts_sha256'])[:12]} there, "
                        f"{want['artifacts_sha256'][:12]} here: re-exported or another model)")
    return "different " + ", ".join(parts)


def prepare(job: SampleJob) -> None:
    """Write job.json, or check that the folder holds this same job, under the folder's lock: two jobs
    started into one new folder at once cannot both find it free and mix their shards."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC
    with locked(out):
        if spec_path.is_file():
            diff = difference(job, read_spec(spec_path))
            if diff:
                raise ValueError(f"{out} holds another sampling job ({diff}); choose another --out")
        else:
            atomic_write_bytes(spec_path, (json.dumps(job.spec(), indent=2) + "\n").encode())


# ------------------------------------------------------------------------------ npz, written in chunks


def _npy_header(shape: tuple[int, ...], dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(int(x) for x in shape)})
    return buf.getvalue()


def write_npz(f: IO[bytes], arrays: Iterable[tuple[str, tuple[int, ...], np.dtype, Iterable]]) -> None:
    """An .npz into ``f``, each array (name, shape, dtype, chunks of its C-order bytes) written chunk by
    chunk: an array larger than memory never has to be whole. ZIP_STORED and fixed timestamps, so the same
    arrays give the same bytes."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, shape, dtype, chunks in arrays:
            want, got = math.prod(shape) * np.dtype(dtype).itemsize, 0
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), "w", force_zip64=True) as m:
                m.write(_npy_header(shape, dtype))
                for chunk in chunks:
                    got += m.write(chunk)
            if got != want:
                raise ValueError(f"{name}: {got} bytes written for shape {shape} ({want} expected)")


def _whole(a: np.ndarray) -> tuple[tuple[int, ...], np.dtype, list]:
    a = np.ascontiguousarray(a)
    return a.shape, a.dtype, [memoryview(a).cast("B")] if a.size else []


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran-order array")
    return shape, dtype


# ------------------------------------------------------------------------------ shards


class ShardDamaged(Exception):
    """Why a shard that is there cannot be used."""


_VERIFIED: dict[str, tuple] = {}  # shard path -> (file identities, job hash) when it was verified
_SAID: set[tuple] = set()  # damaged shards already said on stderr


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_record(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardDamaged(f"no record {path.name}") from None
    except (OSError, ValueError) as e:
        raise ShardDamaged(f"unreadable record {path.name}: {e}") from None
    if not isinstance(rec, dict):
        raise ShardDamaged(f"record {path.name} is not an object")
    return rec


def _check_contents(data: bytes, job: SampleJob, s: int, rec: dict) -> tuple[int, ...]:
    """The images' shape, after checking shard s's arrays against its range (the images are read up to
    their header only: the sha256 already vouches for their bytes)."""
    rng = job.shard_range(s)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            with zf.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
            with zf.open("indices.npy") as f:
                indices = np.lib.format.read_array(f, allow_pickle=False)
            with zf.open("images.npy") as f:
                shape, dtype = _read_header(f)
                payload = zf.getinfo("images.npy").file_size - f.tell()
    except _READ_ERRORS as e:
        raise ShardDamaged(f"unreadable: {type(e).__name__}: {e}") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[1:] != (rec.get("image_size"),) * 2 + (3,):
        raise ShardDamaged(f"images are {dtype} {list(shape)}, not uint8 [n, {rec.get('image_size')}, "
                           f"{rec.get('image_size')}, 3]")
    if shape[0] != len(rng):
        raise ShardDamaged(f"{shape[0]} images where its range {rng.start}-{rng.stop - 1} has {len(rng)}")
    if payload != math.prod(shape):
        raise ShardDamaged(f"{payload} bytes of images for shape {list(shape)}")
    if indices.tolist() != list(rng):
        raise ShardDamaged(f"indices are not {rng.start}-{rng.stop - 1}")
    if labels.tolist() != job.shard_labels(s):
        raise ShardDamaged("labels are not the job's classes for its range")
    return tuple(shape)


def verify_shard(job: SampleJob, s: int) -> tuple[bytes, tuple[int, ...]]:
    """Shard s's bytes and image shape, checked against its record (job, range, count, size, sha256) and
    its range (images, labels, indices). FileNotFoundError when it is not there, ShardDamaged when it is
    unusable."""
    data = job.shard_path(s).read_bytes()
    rec = _read_record(job.record_path(s))
    rng = job.shard_range(s)
    want = {"job": job.job_sha256, "shard": s, "start": rng.start, "count": len(rng)}
    wrong = [k for k in want if rec.get(k) != want[k]]
    if wrong:
        k = wrong[0]
        raise ShardDamaged("its record is another job's" if k == "job" else
                           f"its record has {k} {rec.get(k)!r} where the job has {want[k]!r}")
    if len(data) != rec.get("bytes") or hashlib.sha256(data).hexdigest() != rec.get("sha256"):
        raise ShardDamaged(f"{len(data)} bytes that do not match its record's size and sha256: truncated or modified")
    return data, _check_contents(data, job, s, rec)


def shard_ok(job: SampleJob, s: int, note: str = "redoing it") -> bool:
    """Whether shard s is there and verified (a file verified before is recognised by its identity and that
    of its record: device, inode, size, mtime, ctime); a damaged one is said on stderr once."""
    path = job.shard_path(s)
    ident = _identity(path)
    if ident is None:
        return False
    key = (ident, _identity(job.record_path(s)), job.job_sha256)
    if _VERIFIED.get(str(path)) == key:
        return True
    try:
        verify_shard(job, s)
    except FileNotFoundError:
        return False
    except ShardDamaged as e:
        if (str(path), ident) not in _SAID:
            _SAID.add((str(path), ident))
            print(f"restok: shard {s} is damaged ({e}; {path}); {note}", file=sys.stderr)
        return False
    _VERIFIED[str(path)] = key
    return True


def write_shard(job: SampleJob, s: int, images: np.ndarray) -> None:
    """Shard s: its record first, then the file, each whole under a temporary name (a shard without its
    record is never left behind by a kill), both deterministic bytes."""
    rng = job.shard_range(s)
    buf = io.BytesIO()
    write_npz(buf, [("images", *_whole(images)), ("labels", *_whole(np.asarray(job.shard_labels(s), np.int64))),
                    ("indices", *_whole(np.arange(rng.start, rng.stop, dtype=np.int64)))])
    data = buf.getvalue()
    rec = {"job": job.job_sha256, "shard": s, "start": rng.start, "count": len(rng), "image_size": int(images.shape[1]),
           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(job.record_path(s), (json.dumps(rec) + "\n").encode())
    atomic_write_bytes(job.shard_path(s), data)
    path = job.shard_path(s)
    _VERIFIED[str(path)] = (_identity(path), _identity(job.record_path(s)), job.job_sha256)


# ------------------------------------------------------------------------------ running


def open_pipeline(job: SampleJob, threads: int | None, **backend_options):
    """The job's Pipeline, on an export whose content is still the job's (a re-export since the job was
    checked would mix two models' images)."""
    from restok.manifest import Manifest
    from restok.runtime import Pipeline

    m = Manifest.read(job.artifacts)
    if manifest_identity(m) != job.artifacts_sha256:
        raise ValueError(f"{job.artifacts} changed while the job started (re-exported?); its content is not "
                         f"{job.out}'s job: rerun the command")
    return Pipeline(job.artifacts, job.backend, threads=threads, manifest=m, **backend_options)


def run_shard(pipe, job: SampleJob, s: int) -> int:
    """Generate shard ``s`` (image i: stream i of the job's seed) and write it whole; returns its image count."""
    idx = job.shard_range(s)
    images = [g.images for g in pipe.runs(job.shard_labels(s), job.sampling, seed=job.seed, noise_start=idx.start,
                                          output="uint8")]
    write_shard(job, s, np.concatenate(images))
    return len(idx)


def run_local(job: SampleJob, shard: tuple[int, int] = (0, 1), progress: bool = True, **backend_options) -> list[int]:
    """This process's share of the missing shards (shard s belongs to worker s mod N); returns those done."""
    from tqdm import tqdm

    i, n = shard
    mine = [s for s in job.pending() if s % n == i]
    if not mine:
        return []
    with open_pipeline(job, job.threads, **backend_options) as pipe:
        with tqdm(total=sum(len(job.shard_range(s)) for s in mine), desc="sampling", unit="img",
                  disable=None if progress else True) as bar:
            for s in mine:
                bar.update(run_shard(pipe, job, s))
    return mine


class _ShardWriter:
    """A Ray Data actor: one backend, any number of shards."""

    def __init__(self, job: dict, options: dict):
        self.job = SampleJob(**{**job, "sampling": SamplingParams(**job["sampling"])})
        self.pipe = open_pipeline(self.job, self.job.threads or 1, **options)

    def __call__(self, batch: dict) -> dict:
        for s in batch["shard"]:
            run_shard(self.pipe, self.job, int(s))
        return {"shard": np.asarray(batch["shard"])}


def run_ray(job: SampleJob, actors: int = 2, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
            **backend_options) -> list[int]:
    """The missing shards as a Ray Data job: ``map_batches`` over shard ids with one backend per actor (GPU
    actors with ``gpus_per_actor``). Uses the running Ray (``ray.init`` or RAY_ADDRESS), else starts one."""
    import ray

    todo = job.pending()
    if not todo:
        return []
    if not ray.is_initialized():
        ray.init(num_cpus=max(2 * actors, 2), include_dashboard=False, log_to_driver=False)
    spec = {**asdict(job), "sampling": job.sampling.to_dict()}
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_ShardWriter, fn_constructor_kwargs={"job": spec, "options": backend_options}, batch_size=1, concurrency=actors,
                        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
    return sorted(int(r["shard"]) for r in ds.take_all())


# ------------------------------------------------------------------------------ samples.npz


def _image_chunks(sources: list[SampleJob], size: int) -> Iterator[bytes]:
    """The images of every shard in order, each shard verified as it is read (one shard in memory)."""
    for s, src in enumerate(sources):
        try:
            data, shape = verify_shard(src, s)
        except (FileNotFoundError, ShardDamaged) as e:
            raise ValueError(f"shard {s} of {src.out} changed while {SAMPLES} was written ({e}); run the job "
                             "again to redo it") from None
        if shape[1] != size:
            raise ValueError(f"shard {s} of {src.out} holds {shape[1]}x{shape[1]} images, shard 0 {size}x{size}; "
                             "rerun the job into a new folder")
        yield from _images_of(data)
        del data  # before the next shard is read


def _images_of(data: bytes) -> Iterator[bytes]:
    """A shard's image bytes in chunks (its own frame: the zip objects, which hold ``data``, end with it)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf, zf.open("images.npy") as f:
        _read_header(f)
        while chunk := f.read(_CHUNK):
            yield chunk


def _write_samples(job: SampleJob, sources: list[SampleJob]) -> Path:
    """samples.npz streamed from the verified shards (``sources[s]`` holds shard s) into a temporary file
    renamed over it, then samples.json."""
    out = Path(job.out)
    size = int(_read_record(sources[0].record_path(0)).get("image_size") or 0)
    shape = (len(job.classes) * job.per_class, size, size, 3)
    with atomic_path(out / SAMPLES) as tmp:
        with open(tmp, "wb") as f:
            write_npz(f, [("arr_0", shape, np.uint8, _image_chunks(sources, size))])
            f.flush()
            os.fsync(f.fileno())
    index = [{"index": i, "class": c, "seed": job.seed} for i, c in enumerate(job.labels)]
    doc = {"images": len(index), "shape": list(shape), "job": job.spec(), "index": index}
    atomic_write_bytes(out / INDEX, (json.dumps(doc) + "\n").encode())
    return out / SAMPLES


def assemble(job: SampleJob) -> Path | None:
    """samples.npz + samples.json once every shard is there and verified (None while some are missing)."""
    if job.pending():
        return None
    return _write_samples(job, [job] * job.num_shards)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def merge_jobs(folders: list[str | os.PathLike]) -> list[SampleJob]:
    """The job of each folder (its job.json); every one must be the first one's job."""
    jobs: list[SampleJob] = []
    for d in map(Path, folders):
        if not (d / SPEC).is_file():
            raise ValueError(f"--merge: {d} has no {SPEC} (not a restok sample --out folder); give the folders "
                             "the --shard runs wrote")
        doc = read_spec(d / SPEC)
        job = SampleJob.from_spec(doc, d, d / SPEC)
        diff = difference(jobs[0], doc) if jobs else None
        if diff:
            raise ValueError(f"--merge: {d} holds another sampling job than {jobs[0].out} ({diff}); merge only "
                             "the folders of one job")
        jobs.append(job)
    return jobs


def merge(folders: list[str | os.PathLike], out: str | os.PathLike) -> tuple[Path, SampleJob]:
    """Join the shards that ``--shard i/N`` runs wrote into different folders (one job) into ``out``'s
    samples.npz + samples.json; every shard must be in one of them and verified."""
    jobs = merge_jobs(folders)
    sources, missing = [], []
    for s in range(jobs[0].num_shards):
        src = next((j for j in jobs if shard_ok(j, s, note="not used")), None)
        if src is None:
            missing.append(s)
        sources.append(src)
    if missing:
        raise ValueError(f"--merge: shard(s) {_ranges(missing)} of {jobs[0].num_shards} are missing or damaged in "
                         "every folder; run their --shard i/N job again, then merge")
    target = SampleJob.from_spec(jobs[0].spec(), out)
    prepare(target)
    return _write_samples(target, sources), target
