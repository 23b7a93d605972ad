"""The artifact schema: ``manifest.json`` of an export folder (read, write, validate). No torch.

An export folder holds one ONNX graph per HAR step, the tokenizer decoder (and encoder) graphs, a shared
weights file and ``manifest.json``, which records the schema version, the models' configs, the schedule,
each graph's inputs/outputs (names, shapes, dtypes), the precision, opset and tool versions, and every file
with its size and sha256. The manifest is written last and atomically: a folder without one is not an
export. Readers refuse a manifest from another schema version, missing or truncated files and hashes that
do not match, with a message that names the file and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from restok.fileutil import atomic_write_bytes
from restok.schedule import HARSchedule

SCHEMA = "restok-artifacts"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFIED_CACHE = ".restok-verified.json"
PRECISIONS = ("fp32", "fp16")  # what restok export writes
QUANTIZED = ("int8", "fp8", "int8-weight-only", "int8-dynamic")  # what restok calibrate writes

__all__ = [
    "ArtifactError",
    "GraphSpec",
    "Manifest",
    "TensorSpec",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "sha256_file",
]


class ArtifactError(ValueError):
    """Artifacts are missing, damaged or from another version; the message says what to rebuild."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: float32, float16, int64

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    name: str  # step0..stepN-1, decoder, encoder
    file: str  # relative to the export folder
    kind: str  # generator_step | decoder | encoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    step: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(
            d["name"], d["file"], d["kind"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            d.get("step"),
        )

    def to_dict(self) -> dict:
        d = {"name": self.name, "file": self.file, "kind": self.kind,
             "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}
        if self.step is not None:
            d["step"] = self.step
        return d

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no input {name!r}")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no output {name!r}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@dataclass
class Manifest:
    """The content of manifest.json."""

    precision: str
    batch: int
    guided: bool
    opset: int
    schedule: dict
    tokenizer: dict
    generator: dict
    graphs: dict[str, GraphSpec]
    files: dict[str, dict] = field(default_factory=dict)
    # shared external-data files: {file: {tensor name: {"offset", "shape", "dtype"}}}
    weights: dict[str, dict] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)  # for Q/DQ artifacts: method, samples, exclusions, quality
    kv_cache: str = "concat"  # concat: past_*/present_* per pass; inplace: one cache_* buffer updated in place
    # inplace exports also carry past/present step graphs for TensorRT < 10.15:
    # {"kv_cache": "concat", "opset": 20, "graphs": {"step0": GraphSpec dict, ...}} (same weights.bin)
    fallback: dict = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    # ----------------------------------------------------------------- derived
    @property
    def rows(self) -> int:
        """Rows of the generator graphs: the batch doubled when guidance is exported."""
        return 2 * self.batch if self.guided else self.batch

    def har_schedule(self) -> HARSchedule:
        return HARSchedule.from_dict(self.schedule)

    @property
    def num_steps(self) -> int:
        return len([g for g in self.graphs.values() if g.kind == "generator_step"])

    def step_graph(self, i: int) -> GraphSpec:
        return self.graphs[f"step{i}"]

    @property
    def image_size(self) -> int:
        return int(self.tokenizer["image_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.generator["vocab_size"])

    @property
    def num_classes(self) -> int:
        return int(self.generator["num_classes"])

    @property
    def num_tokens(self) -> int:
        return int(self.generator["block_size"])

    def kv_cache_view(self, mode: str) -> "Manifest":
        """This export seen with the ``mode`` KV-cache step graphs: itself, or its fallback graph set."""
        if mode == self.kv_cache:
            return self
        fb = self.fallback
        if fb.get("kv_cache") != mode:
            raise ArtifactError(f"these artifacts hold {self.kv_cache} KV-cache step graphs and no {mode} set; "
                                f"re-export with --kv-cache {mode}")
        graphs = {**self.graphs, **{k: GraphSpec.from_dict(g) for k, g in fb["graphs"].items()}}
        return replace(self, graphs=graphs, kv_cache=mode, opset=int(fb["opset"]), fallback={})

    # --------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        d = asdict(self)
        d["graphs"] = {k: g.to_dict() for k, g in self.graphs.items()}
        return {"schema": SCHEMA, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        if d.get("schema") != SCHEMA:
            raise ArtifactError(f"{where} is not a restok artifacts manifest (schema {d.get('schema')!r})")
        v = d.get("schema_version")
        if v != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where} has schema version {v}, this restok reads version {SCHEMA_VERSION}; "
                "re-export the artifacts with this version (restok export ...)"
            )
        try:
            graphs = {k: GraphSpec.from_dict(g) for k, g in d["graphs"].items()}
            fields_ = {k: d[k] for k in ("precision", "batch", "guided", "opset", "schedule", "tokenizer", "generator")}
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{where} is incomplete ({e}); re-export the artifacts") from e
        return cls(graphs=graphs, files=d.get("files", {}), weights=d.get("weights", {}), source=d.get("source", {}),
                   tools=d.get("tools", {}), calibration=d.get("calibration", {}), kv_cache=d.get("kv_cache", "concat"),
                   fallback=d.get("fallback", {}),
                   created=d.get("created", ""),
                   schema_version=v, **fields_)

    def write(self, folder: str | os.PathLike) -> Path:
        """Hash every listed file, then write manifest.json atomically (the last file of an export)."""
        folder = Path(folder)
        files = {}
        for rel in sorted(self.files):
            p = folder / rel
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        self.files = files
        return atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def read(cls, folder: str | os.PathLike, verify: bool = True) -> "Manifest":
        """Read and validate; with ``verify`` check each file's size and sha256 (hashes of unchanged files
        are remembered in a small cache file next to the manifest, keyed by size and mtime)."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise ArtifactError(f"artifacts folder {folder} does not exist; create one with restok export --out {folder}")
        if not path.is_file():
            raise ArtifactError(
                f"{folder} has no {MANIFEST_NAME}: not an export, or an export that did not finish; "
                f"run restok export --out {folder}"
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifacts") from e
        m = cls.from_dict(d, str(path))
        for g in [*m.graphs.values(), *(GraphSpec.from_dict(x) for x in m.fallback.get("graphs", {}).values())]:
            if g.file not in m.files:
                raise ArtifactError(f"{path}: graph {g.name} file {g.file} is not listed in files; re-export")
        if verify:
            m.verify_files(folder)
        return m

    def verify_files(self, folder: Path) -> None:
        cache_path = folder / VERIFIED_CACHE
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        changed = False
        for rel, info in self.files.items():
            p = folder / rel
            if not p.is_file():
                raise ArtifactError(f"{p} is missing; re-export the artifacts (restok export --out {folder})")
            st = p.stat()
            if st.st_size != info["bytes"]:
                raise ArtifactError(
                    f"{p} has {st.st_size} bytes, the manifest says {info['bytes']} (truncated or replaced); "
                    "re-export the artifacts"
                )
            key = [st.st_size, st.st_mtime_ns, info["sha256"]]
            if cache.get(rel) == key:
                continue
            if sha256_file(p) != info["sha256"]:
                raise ArtifactError(f"{p} does not match the sha256 in the manifest (modified or corrupt); re-export the artifacts")
            cache[rel] = key
            changed = True
        if changed:
            try:
                atomic_write_bytes(cache_path, json.dumps(cache).encode())
            except OSError:
                pass  # a read-only folder: verify again next time
