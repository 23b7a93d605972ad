"""Export the generator (one graph per HAR step) and the tokenizer (decoder, encoder) to ONNX.

The export is built in a sibling staging folder and swapped in only when complete, with manifest.json
written last: an export killed half way leaves the previous export (or nothing) in place, never a folder
that looks valid. Weights are written once per model into a shared external-data file
(``generator/weights.bin``, ``tokenizer/weights.bin``), deduplicated by content across the step graphs,
so the nine step graphs cost the disk space of one model.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import io
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import restok
from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorStepGraph
from restok.fileutil import replace_dir, staging_dir
from restok.manifest import MANIFEST_NAME, PRECISIONS, ArtifactError, GraphSpec, Manifest, TensorSpec
from restok.models.generator import HARGenerator
from restok.models.tokenizer import ResTok

DEFAULT_OPSET = 20
FALLBACK_OPSET = 20  # the past/present fallback of an inplace export: parsed by every TensorRT 10.x
ALIGN = 4096  # external-data offsets, so the weights file can be memory-mapped
MIN_EXTERNAL_BYTES = 1024

_ONNX_DTYPES = {11: "float64", 1: "float32", 3: "int8", 17: "float8e4m3fn", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


@dataclass
class ExportOptions:
    precision: str = "fp32"
    batch: int = 1
    guided: bool = True
    opset: int = DEFAULT_OPSET
    encoder: bool = True
    kv_cache: str = "concat"  # concat (past/present, any TensorRT) | inplace (TensorScatter, opset 24, TensorRT >= 10.15)
    # inplace only: also write past/present step graphs (opset 20, same weights.bin) for TensorRT < 10.15
    concat_fallback: bool = True

    def validate(self) -> None:
        if self.kv_cache not in ("concat", "inplace"):
            raise ValueError(f"kv_cache must be concat or inplace, got {self.kv_cache!r}")
        if self.kv_cache == "inplace" and self.opset < 24:
            raise ValueError("--kv-cache inplace needs opset 24 (ONNX TensorScatter); use --opset 24")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not 18 <= self.opset <= 24:
            raise ValueError(f"opset must be in [18, 24], got {self.opset}")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A content hash of a model's weights (names, dtypes, shapes, bytes), to tie artifacts to weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tool_versions() -> dict:
    import onnx

    out = {"restok": restok.__version__, "torch": torch.__version__, "onnx": onnx.__version__}
    for mod in ("onnxscript", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines and warnings; keep them out of our output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _export_onnx(module: torch.nn.Module, args: tuple, input_names, output_names, path: Path, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            module, args, str(path), input_names=list(input_names), output_names=list(output_names),
            opset_version=opset, dynamo=True, external_data=True,
        )


def _specs(values) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        out.append(TensorSpec(v.name, tuple(int(d.dim_value) for d in tt.shape.dim), _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))))
    return tuple(out)


class WeightsFile:
    """Appends initializers to one external-data file, once per distinct content."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}
        self.index: dict[str, dict] = {}  # name -> offset, shape, dtype (for runtimes that share weights)

    def close(self) -> None:
        self.f.close()

    def externalize(self, model, location: str) -> None:
        """Move every large initializer of ``model`` (an onnx ModelProto, data loaded) into the file and
        give it a content-derived name, so identical tensors in different graphs share storage and name."""
        from onnx import TensorProto

        renames = {}
        for init in model.graph.initializer:
            raw = init.raw_data
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            key = hashlib.sha256(f"{init.data_type}|{tuple(init.dims)}|".encode() + raw).hexdigest()
            if key not in self.offsets:
                pos = self.f.tell()
                pad = (-pos) % ALIGN
                self.f.write(b"\0" * pad)
                self.offsets[key] = (pos + pad, len(raw))
                self.f.write(raw)
            off, length = self.offsets[key]
            new_name = f"w_{key[:24]}"
            self.index[new_name] = {"offset": off, "shape": [int(d) for d in init.dims],
                                    "dtype": _ONNX_DTYPES.get(init.data_type, str(init.data_type))}
            renames[init.name] = new_name
            init.name = new_name
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", location), ("offset", str(off)), ("length", str(length))):
                e = init.external_data.add()
                e.key, e.value = k, v
        # an initializer may be used twice in one graph: keep one copy
        seen, keep = set(), []
        for init in model.graph.initializer:
            if init.name not in seen:
                seen.add(init.name)
                keep.append(init)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        for vi in model.graph.value_info:
            if vi.name in renames:
                vi.name = renames[vi.name]


def _finish_graphs(staging: Path, folder: str, names: list[str]) -> tuple[dict[str, Path], dict]:
    """Consolidate the exporter's per-graph data files of ``folder`` into one weights.bin; check each graph."""
    import onnx

    wf = WeightsFile(staging / folder / "weights.bin")
    out = {}
    try:
        for name in names:
            raw = staging / folder / f"{name}.raw.onnx"
            model = onnx.load(str(raw), load_external_data=True)
            wf.externalize(model, "weights.bin")
            final = staging / folder / f"{name}.onnx"
            wf.f.flush()
            onnx.save(model, str(final))
            for p in raw.parent.glob(f"{name}.raw.onnx*"):
                p.unlink()
            out[name] = final
    finally:
        wf.close()
    for name, p in out.items():
        onnx.checker.check_model(str(p))
    return out, wf.index


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="graph", file=sys.stderr, disable=None)


def export_artifacts(
    tokenizer: ResTok,
    generator: HARGenerator,
    out: str | os.PathLike,
    options: ExportOptions | None = None,
    source: dict | None = None,
    progress: bool = True,
    on_graph: Callable[[str], None] | None = None,
) -> Manifest:
    """Export every graph of (tokenizer, generator) to ``out`` and write its manifest. Returns the manifest."""
    opts = options or ExportOptions()
    opts.validate()
    if tokenizer.cfg.codebook_size != generator.cfg.vocab_size or tokenizer.cfg.num_latent_tokens != generator.cfg.block_size:
        raise ValueError("the tokenizer and the generator do not belong together (codebook/vocab or token count differ)")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).exists())):
        raise ArtifactError(f"{out} exists and is not a restok export; refusing to overwrite it (choose another --out)")
    staging = staging_dir(out)
    try:
        manifest = _export_into(staging, tokenizer, generator, opts, source or {}, progress, on_graph)
        manifest.write(staging)
        replace_dir(staging, out)
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _for_export(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model in ``dtype`` on the CPU: itself when it already is (no copy of a large model), else a copy."""
    p = next(model.parameters())
    if p.dtype == dtype and p.device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu", dtype)


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, t in zip(models, modes):
            m.train(t)


def _export_into(staging, tokenizer, generator, opts, source, progress, on_graph) -> Manifest:
    dtype = torch.float16 if opts.precision == "fp16" else torch.float32
    gen, tok = _for_export(generator, dtype), _for_export(tokenizer, dtype)
    with _eval_mode(gen, tok):
        return _export_graphs(staging, tok, gen, tokenizer, generator, opts, source, progress, on_graph)


def _export_graphs(staging, tok, gen, tokenizer, generator, opts, source, progress, on_graph) -> Manifest:
    schedule = gen.schedule
    # (graph name, module, opset): the step graphs, then the past/present fallback set of an inplace export
    steps = [(f"step{i}", GeneratorStepGraph(gen, schedule, i, opts.guided, opts.kv_cache), opts.opset)
             for i in range(schedule.num_steps)]
    fallback = opts.kv_cache == "inplace" and opts.concat_fallback
    if fallback:
        steps += [(f"step{i}.concat", GeneratorStepGraph(gen, schedule, i, opts.guided, "concat"), FALLBACK_OPSET)
                  for i in range(schedule.num_steps)]
    tok_graphs = {"decoder": DecoderGraph(tok)}
    if opts.encoder:
        tok_graphs["encoder"] = EncoderGraph(tok)
    graphs: dict[str, GraphSpec] = {}
    bar = _progress(len(steps) + len(tok_graphs), "exporting") if progress else None
    try:
        for name, m, opset in steps:
            _export_onnx(m, m.example_inputs(opts.batch), m.input_names(), m.output_names(),
                         staging / "generator" / f"{name}.raw.onnx", opset)
            if on_graph:
                on_graph(name)
            if bar:
                bar.update(1)
        for name, m in tok_graphs.items():
            _export_onnx(m, m.example_inputs(opts.batch), m.input_names(), m.output_names(),
                         staging / "tokenizer" / f"{name}.raw.onnx", opts.opset)
            if on_graph:
                on_graph(name)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    import onnx

    files, weights, fallback_graphs = {}, {}, {}
    for folder, names, kind_of in (
        ("generator", [name for name, _, _ in steps], lambda n: "generator_step"),
        ("tokenizer", list(tok_graphs), lambda n: n),
    ):
        finished, index = _finish_graphs(staging, folder, names)
        files[f"{folder}/weights.bin"] = {}
        weights[f"{folder}/weights.bin"] = index
        for name, path in finished.items():
            model = onnx.load(str(path), load_external_data=False)
            rel = f"{folder}/{name}.onnx"
            files[rel] = {}
            key = name.split(".")[0]  # step3.concat -> step3
            spec = GraphSpec(key, rel, kind_of(name), _specs(model.graph.input), _specs(model.graph.output),
                             int(key[4:]) if key.startswith("step") else None)
            if name.endswith(".concat"):
                fallback_graphs[key] = spec.to_dict()
            else:
                graphs[key] = spec
    return Manifest(
        precision=opts.precision, batch=opts.batch, guided=opts.guided, opset=opts.opset, kv_cache=opts.kv_cache,
        fallback={"kv_cache": "concat", "opset": FALLBACK_OPSET, "graphs": fallback_graphs} if fallback_graphs else {},
        schedule=schedule.to_dict(), tokenizer=tokenizer.cfg.to_dict(), generator=generator.cfg.to_dict(),
        graphs=graphs, files=files, weights=weights,
        source={**source, "tokenizer_sha256": state_dict_sha256(tokenizer), "generator_sha256": state_dict_sha256(generator)},
        tools=_tool_versions(), created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
