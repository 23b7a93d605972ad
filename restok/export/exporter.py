"""Export the generator (one graph for every HAR pass and batch size) and the tokenizer (decoder, encoder).

The export is built in a sibling staging folder and swapped in only when complete, with manifest.json
written last: an export killed at any instant leaves the previous export (or nothing) at the path, never a
folder that looks valid, and files restok did not write there (engines, Polygraphy files) are kept.
Weights are written once per model into an external-data file (``generator/weights.bin``,
``tokenizer/weights.bin``), deduplicated by content, so an in-place export's past/present fallback graph
costs no second copy.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

import restok
from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorGraph
from restok.fileutil import staged
from restok.onnx_weights import WeightsFile
from restok.contract import KV_CACHES, GraphSpec, TensorSpec
from restok.manifest import (DEFAULT_MAX_BATCH, MANIFEST_NAME, ONNX_DTYPES, PRECISIONS, ArtifactError, Manifest,
                             export_files)
from restok.models.generator import HARGenerator
from restok.models.tokenizer import ResTok

DEFAULT_OPSET = 20
INPLACE_OPSET = 24  # ONNX TensorScatter
FALLBACK_OPSET = 20  # the past/present fallback of an inplace export and its tokenizer graphs: every TensorRT 10.x


@dataclass
class ExportOptions:
    precision: str = "fp32"
    max_batch: int = DEFAULT_MAX_BATCH  # every graph takes 1..max_batch images; TensorRT profiles end there
    guided: bool = True
    opset: int | None = None  # default: 20, or 24 with the in-place KV cache
    encoder: bool = True
    kv_cache: str = "concat"  # concat (past/present, any TensorRT) | inplace (TensorScatter, opset 24, TensorRT >= 10.15)
    # inplace only: also write a past/present generator graph (opset 20, same weights.bin) for TensorRT < 10.15
    concat_fallback: bool = True

    @property
    def generator_opset(self) -> int:
        return self.opset or (INPLACE_OPSET if self.kv_cache == "inplace" else DEFAULT_OPSET)

    @property
    def tokenizer_opset(self) -> int:
        """The tokenizer graphs of an in-place export are built by TensorRT < 10.15 too: fallback opset (fp32
        attention at opset >= 23 becomes ONNX Attention, which TensorRT parses only from 10.14)."""
        return FALLBACK_OPSET if self.kv_cache == "inplace" else self.generator_opset

    def validate(self) -> None:
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 1024:
            raise ValueError(f"max batch must be an integer in [1, 1024], got {self.max_batch!r}")
        op = self.generator_opset
        if not 18 <= op <= 24:
            raise ValueError(f"opset must be in [18, 24], got {op}")
        if self.kv_cache == "inplace" and op < INPLACE_OPSET:
            raise ValueError("--kv-cache inplace needs opset 24 (ONNX TensorScatter); use --opset 24")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A content hash of a model's weights (``restok.checkpoints.weights_sha256`` of its state dict)."""
    from restok.checkpoints import weights_sha256

    return weights_sha256(model.state_dict())


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


def _export_onnx(module: torch.nn.Module, path: Path, opset: int, max_batch: int) -> None:
    """One graph with the module's signature: names in order, every symbolic dimension dynamic."""
    ins, outs = module.signature()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            module, module.example_inputs(), str(path), input_names=[t.name for t in ins],
            output_names=[t.name for t in outs], opset_version=opset, dynamo=True, external_data=True,
            dynamic_shapes=module.dynamic_shapes(max_batch),
        )


def check_signature(model, specs: tuple[TensorSpec, ...], outputs: bool, where: str) -> None:
    """The ONNX graph's inputs/outputs must be the declared ones: same names in order, dtypes, static sizes,
    and a symbolic dimension wherever the signature has a symbol (the exporter must not specialise one)."""
    values = list(model.graph.output if outputs else model.graph.input)
    if [v.name for v in values] != [t.name for t in specs]:
        raise RuntimeError(f"{where}: graph {'outputs' if outputs else 'inputs'} {[v.name for v in values]} "
                           f"differ from the declared {[t.name for t in specs]}")
    for v, t in zip(values, specs):
        tt = v.type.tensor_type
        dtype = ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))
        dims = list(tt.shape.dim)
        if dtype != t.dtype or len(dims) != len(t.shape):
            raise RuntimeError(f"{where}: {v.name} is {dtype} of rank {len(dims)}, declared {t.dtype} {t.shape}")
        for d, want in zip(dims, t.shape):
            static = d.HasField("dim_value")
            if (isinstance(want, int) and (not static or d.dim_value != want)) or (isinstance(want, str) and static):
                raise RuntimeError(f"{where}: {v.name} has shape {[x.dim_value if x.HasField('dim_value') else x.dim_param for x in dims]}, "
                                   f"declared {list(t.shape)}")


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
        raise ArtifactError(f"{out} exists and is not a restok export; refusing to write into it (choose another --out)")
    with staged(out, owned=export_files) as stage:
        manifest = _export_into(stage, tokenizer, generator, opts, source or {}, progress, on_graph)
        manifest.write(stage)
    return manifest


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
    # (graph name, folder, module, opset): the generator, its past/present fallback, the tokenizer graphs
    graphs = [("generator", "generator", GeneratorGraph(gen, opts.guided, opts.kv_cache), opts.generator_opset)]
    if opts.kv_cache == "inplace" and opts.concat_fallback:
        graphs.append(("generator.concat", "generator", GeneratorGraph(gen, opts.guided, "concat"), FALLBACK_OPSET))
    graphs.append(("decoder", "tokenizer", DecoderGraph(tok), opts.tokenizer_opset))
    if opts.encoder:
        graphs.append(("encoder", "tokenizer", EncoderGraph(tok), opts.tokenizer_opset))
    bar = _progress(len(graphs), "exporting") if progress else None
    try:
        for name, folder, module, opset in graphs:
            _export_onnx(module, staging / folder / f"{name}.raw.onnx", opset, opts.max_batch)
            if on_graph:
                on_graph(name)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    import onnx

    files, weights, specs = {}, {}, {}
    for folder in ("generator", "tokenizer"):
        names = [name for name, f, _, _ in graphs if f == folder]
        finished, index = _finish_graphs(staging, folder, names)
        files[f"{folder}/weights.bin"] = {}
        weights[f"{folder}/weights.bin"] = index
        for name, path in finished.items():
            module, opset = next((m, o) for n, _, m, o in graphs if n == name)
            model = onnx.load(str(path), load_external_data=False)
            ins, outs = module.signature()
            check_signature(model, ins, False, str(path))
            check_signature(model, outs, True, str(path))
            rel = f"{folder}/{name}.onnx"
            files[rel] = {}
            specs[name] = GraphSpec(name.split(".")[0], rel, ins, outs, opset)
    fallback = specs.pop("generator.concat", None)
    return replace(describe_export(tokenizer, generator, opts, source, graphs=specs), files=files, weights=weights,
                   fallback={"kv_cache": "concat", "opset": FALLBACK_OPSET, "generator": fallback.to_dict()} if fallback else {},
                   source={**source, "tokenizer_sha256": state_dict_sha256(tokenizer),
                           "generator_sha256": state_dict_sha256(generator)},
                   tools=_tool_versions())


def describe_export(tokenizer: ResTok, generator: HARGenerator, opts: ExportOptions, source: dict,
                    graphs: dict[str, GraphSpec] | None = None) -> Manifest:
    """The manifest an export of these models with ``opts`` records, without writing a graph: what the cuda
    backend needs to run models that exist only as a ``source`` (a preset with seeded weights, say an L
    model on a GPU machine that has no room or time for its ONNX files). ``graphs``: the written graphs'
    specs; default: the modules' signatures (no files)."""
    opts.validate()
    if graphs is None:
        modules = [("generator", GeneratorGraph(generator, opts.guided, opts.kv_cache), opts.generator_opset),
                   ("decoder", DecoderGraph(tokenizer), opts.tokenizer_opset)]
        if opts.encoder:
            modules.append(("encoder", EncoderGraph(tokenizer), opts.tokenizer_opset))
        graphs = {name: GraphSpec(name, "", *module.signature(), opset) for name, module, opset in modules}
    return Manifest(
        precision=opts.precision, max_batch=opts.max_batch, guided=opts.guided, opset=opts.generator_opset,
        kv_cache=opts.kv_cache, schedule=generator.schedule.to_dict(), tokenizer=tokenizer.cfg.to_dict(),
        generator=generator.cfg.to_dict(), graphs=graphs, source=dict(source),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
