"""``restok sample``: large offline sampling jobs (e.g. 50 images per class x 1,000 classes for gFID), written
in resumable shards and assembled into the ADM evaluator's ``samples.npz`` (uint8 [N, S, S, 3] under
``arr_0``) with an index (class, seed, index per image).

Image i of a job is class ``labels[i]`` drawn with noise stream (seed, i): whichever way the job runs —
in-process, split by ``--shard i/N`` across a Slurm array or Kubernetes jobs, or as a Ray Data job with one
backend per actor — the same seed gives the same images. A shard file is written whole (temporary name,
then rename) and never redone; a killed job resumes at the shards that are missing.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from restok.fileutil import atomic_write_bytes
from restok.sampling_params import SamplingParams

SPEC, INDEX, SAMPLES = "job.json", "samples.json", "samples.npz"


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

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.shard_size < 1 or not self.classes:
            raise ValueError("--per-class and --shard-size must be >= 1 and at least one class is needed")
        self.sampling.validate()

    @property
    def labels(self) -> list[int]:
        return [c for c in self.classes for _ in range(self.per_class)]

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.labels) / self.shard_size)

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min(len(self.labels), (s + 1) * self.shard_size))

    def shard_path(self, s: int) -> Path:
        return Path(self.out) / "shards" / f"shard_{s:05d}.npz"

    def pending(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    def spec(self) -> dict:
        """What makes the images: a rerun into the same folder must match it."""
        d = asdict(self)
        for k in ("out", "backend", "threads"):
            d.pop(k)
        d["sampling"] = self.sampling.to_dict()
        return d


def prepare(job: SampleJob) -> None:
    """Write job.json (or check that the folder holds this same job, so shards are never mixed)."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC
    want = job.spec()
    if spec_path.is_file():
        try:
            have = json.loads(spec_path.read_text())
        except ValueError as e:
            raise ValueError(f"{spec_path} is damaged ({e}); choose another --out") from e
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise ValueError(f"{out} holds another sampling job (different {', '.join(diff)}); choose another --out")
    else:
        atomic_write_bytes(spec_path, (json.dumps(want, indent=2) + "\n").encode())


def run_shard(pipe, job: SampleJob, s: int) -> int:
    """Generate shard ``s`` (image i: stream i of the job's seed) and write it whole; returns its image count."""
    idx = list(job.shard_range(s))
    labels = [job.labels[i] for i in idx]
    images = [g.images for g in pipe.runs(labels, job.sampling, seed=job.seed, noise_start=idx[0], output="uint8")]
    buf = io.BytesIO()
    np.savez(buf, images=np.concatenate(images), labels=np.asarray(labels), indices=np.asarray(idx))
    atomic_write_bytes(job.shard_path(s), buf.getvalue())
    return len(idx)


def run_local(job: SampleJob, shard: tuple[int, int] = (0, 1), progress: bool = True, **backend_options) -> list[int]:
    """This process's share of the missing shards (shard s belongs to worker s mod N); returns those done."""
    from tqdm import tqdm

    from restok.runtime import Pipeline

    i, n = shard
    mine = [s for s in job.pending() if s % n == i]
    if not mine:
        return []
    with Pipeline(job.artifacts, job.backend, threads=job.threads, **backend_options) as pipe:
        with tqdm(total=sum(len(job.shard_range(s)) for s in mine), desc="sampling", unit="img",
                  disable=None if progress else True) as bar:
            for s in mine:
                bar.update(run_shard(pipe, job, s))
    return mine


class _ShardWriter:
    """A Ray Data actor: one backend, any number of shards."""

    def __init__(self, job: dict, options: dict):
        from restok.runtime import Pipeline

        self.job = SampleJob(**{**job, "sampling": SamplingParams(**job["sampling"])})
        self.pipe = Pipeline(self.job.artifacts, self.job.backend, threads=self.job.threads or 1, **options)

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


def assemble(job: SampleJob) -> Path | None:
    """samples.npz + samples.json once every shard is there (None while some are missing)."""
    if job.pending():
        return None
    out = Path(job.out)
    images, index = [], []
    for s in range(job.num_shards):
        with np.load(job.shard_path(s)) as z:
            images.append(z["images"])
            index += [{"index": int(i), "class": int(c), "seed": job.seed} for i, c in zip(z["indices"], z["labels"])]
    arr = np.concatenate(images)
    buf = io.BytesIO()
    np.savez(buf, arr_0=arr)
    atomic_write_bytes(out / SAMPLES, buf.getvalue())
    doc = {"images": len(index), "shape": list(arr.shape), "job": job.spec(), "index": index}
    atomic_write_bytes(out / INDEX, (json.dumps(doc) + "\n").encode())
    return out / SAMPLES
