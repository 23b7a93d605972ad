"""The artifact schema: ``manifest.json`` of an export folder (read, write, validate). No torch.

An export folder holds one generator graph (every HAR pass, every batch size up to ``max_batch``), the
tokenizer decoder (and encoder) graphs, a weights file per model and ``manifest.json``, which records the
schema version, the models' configs, the schedule, each graph's signature (the graph I/O contract: names,
shapes over the symbols below, dtypes, roles, which output feeds or aliases which input), the precision,
opset and tool versions, and every file with its size and sha256. The manifest is written last and
atomically: a folder without one is not an export. Readers refuse a manifest from another schema version,
missing or truncated files and hashes that do not match, with a message that names the file and says
what to do.

The graph I/O contract itself (tensor names, roles, dtypes, shape symbols) is ``restok.contract``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from restok.contract import ArtifactError, GraphSpec, rows
from restok.fileutil import atomic_write_bytes, cache_root
from restok.schedule import HARSchedule

SCHEMA = "restok-artifacts"
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16")  # what restok export writes
QUANTIZED = ("int8", "fp8", "int8-weight-only", "int8-dynamic")  # what restok calibrate writes
DEFAULT_MAX_BATCH = 16

# numpy dtype names used in manifests <- ONNX TensorProto element types
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 3: "int8", 6: "int32", 7: "int64", 9: "bool",
               17: "float8e4m3fn"}

__all__ = [
    "ArtifactError",
    "Manifest",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "np_dtype",
    "export_files",
    "sha256_file",
]


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype of a manifest dtype name (fp8 needs the ml_dtypes package)."""
    if name == "float8e4m3fn":
        try:
            import ml_dtypes
        except ImportError as e:
            raise ImportError("fp8 tensors need the ml_dtypes package (pip install ml_dtypes)") from e
        return np.dtype(ml_dtypes.float8_e4m3fn)
    if name == "bfloat16":
        raise ArtifactError("bfloat16 graph inputs are not supported by this runtime")
    try:
        return np.dtype(name)
    except TypeError as e:
        raise ArtifactError(f"unknown tensor type {name!r} in the manifest; re-export with this restok") from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _content_sha256(d: dict) -> str:
    body = {k: v for k, v in d.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verified_cache_path() -> Path:
    """Hashes of files restok verified, per user (never inside an export, so it cannot travel with it)."""
    return cache_root() / "verified.json"


def _file_identity(st: os.stat_result) -> list[int]:
    """What a copy, an edit or a restored mtime all change: device, inode, size, mtime and ctime (the
    ctime is set by the kernel on every write or metadata change and cannot be restored by cp/rsync/tar)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass
class Manifest:
    """The content of manifest.json."""

    precision: str
    max_batch: int
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
    # inplace exports also carry a past/present generator graph for TensorRT < 10.15:
    # {"kv_cache": "concat", "opset": 20, "generator": GraphSpec dict} (same weights.bin)
    fallback: dict = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    # ----------------------------------------------------------------- derived
    def har_schedule(self) -> HARSchedule:
        return HARSchedule.from_dict(self.schedule)

    @property
    def num_steps(self) -> int:
        return int(self.schedule["num_steps"])

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
    def null_class(self) -> int:
        """The label of the unconditional rows (the generator's extra class-embedding row)."""
        return self.num_classes

    @property
    def num_tokens(self) -> int:
        return int(self.generator["block_size"])

    @property
    def kv_heads(self) -> int:
        return int(self.generator.get("n_kv_head") or self.generator["n_head"])

    @property
    def head_dim(self) -> int:
        return int(self.generator["dim"]) // int(self.generator["n_head"])

    def rows(self, batch: int) -> int:
        """Generator rows for ``batch`` images (``restok.contract.rows``)."""
        return rows(batch, self.guided)

    def kv_cache_view(self, mode: str) -> "Manifest":
        """This export seen with the ``mode`` KV-cache generator graph: itself, or its fallback graph."""
        if mode == self.kv_cache:
            return self
        fb = self.fallback
        if fb.get("kv_cache") != mode:
            raise ArtifactError(f"these artifacts hold a {self.kv_cache} KV-cache generator and no {mode} one; "
                                f"re-export with --kv-cache {mode}")
        graphs = {**self.graphs, "generator": GraphSpec.from_dict("generator", fb["generator"])}
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
                f"{where} has schema version {v}, this restok reads version {SCHEMA_VERSION} (one generator graph "
                "for every pass and batch size); re-export the artifacts with this version: restok export --out DIR"
            )
        try:
            graphs = {k: GraphSpec.from_dict(k, g) for k, g in d["graphs"].items()}
            fields_ = {k: d[k] for k in ("precision", "max_batch", "guided", "opset", "schedule", "tokenizer", "generator")}
            if "generator" not in graphs or "decoder" not in graphs:
                raise KeyError("graphs.generator/decoder")
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{where} is incomplete ({e}); re-export the artifacts") from e
        return cls(graphs=graphs, files=d.get("files", {}), weights=d.get("weights", {}), source=d.get("source", {}),
                   tools=d.get("tools", {}), calibration=d.get("calibration", {}), kv_cache=d.get("kv_cache", "concat"),
                   fallback=d.get("fallback", {}), created=d.get("created", ""), schema_version=v, **fields_)

    def write(self, folder: str | os.PathLike) -> Path:
        """Hash every listed file, then write manifest.json atomically (the last file of an export), with the
        sha256 of its own content: the manifest is what every other file is checked against."""
        folder = Path(folder)
        files = {}
        for rel in sorted(self.files):
            p = folder / rel
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        self.files = files
        d = self.to_dict()
        d["content_sha256"] = _content_sha256(d)
        return atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(d, indent=2) + "\n").encode())

    @classmethod
    def read(cls, folder: str | os.PathLike, verify: bool = True) -> "Manifest":
        """Read and validate; with ``verify`` check each file's size and sha256 (a file already verified
        is recognised by its device, inode, size, mtime and ctime, remembered per user: see verify_files)."""
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifacts") from e
        if not isinstance(d, dict):
            raise ArtifactError(f"{path} is not a restok artifacts manifest; re-export the artifacts")
        m = cls.from_dict(d, str(path))
        if d.get("content_sha256") != _content_sha256(d):
            raise ArtifactError(f"{path} was modified after the export wrote it (its content sha256 does not match); "
                                "re-export the artifacts")
        graph_files = [g.file for g in m.graphs.values()] + ([m.fallback["generator"]["file"]] if m.fallback else [])
        for f in graph_files:
            if f not in m.files:
                raise ArtifactError(f"{path}: graph file {f} is not listed in files; re-export")
        if verify:
            m.verify_files(folder)
        return m

    def verify_files(self, folder: Path) -> None:
        """Size and sha256 of every file. Hashing GPT-L's weights takes about 0.8 s per 1.3 GB here, so files
        already verified are skipped when their identity (``_file_identity``: device, inode, size, mtime,
        ctime) is unchanged. That record lives in the user's cache, not in the export: a copied, edited or
        re-timestamped file has a new identity and is hashed again."""
        folder = Path(folder)
        cache_path = _verified_cache_path()
        try:
            cache = json.loads(cache_path.read_text())
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
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
            key = str(p.resolve())
            ident = [*_file_identity(st), info["sha256"]]
            if cache.get(key) == ident:
                continue
            if sha256_file(p) != info["sha256"]:
                raise ArtifactError(f"{p} does not match the sha256 in the manifest (modified or corrupt); re-export the artifacts")
            if _file_identity(p.stat()) == ident[:-1]:  # unchanged while it was hashed
                cache[key] = ident
                changed = True
        if changed:
            try:
                atomic_write_bytes(cache_path, json.dumps(cache).encode())
            except OSError:
                pass  # no writable cache: verify again next time


def export_files(folder: Path) -> list[str]:
    """The files an export wrote into ``folder`` (from its manifest); nothing if it has no readable one."""
    try:
        m = Manifest.read(folder, verify=False)
    except (ArtifactError, OSError):
        return []
    return [MANIFEST_NAME, *m.files]
