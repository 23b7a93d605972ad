"""PyTorch backend: the reference, run eagerly. The only runtime module that imports torch.

It rebuilds the models an export came from (``manifest.source``: a preset with seeded weights, or
checkpoints), refuses them if their weights hash differs from the one the export recorded, and runs the
very modules that were exported (``restok.export.modules``) in float32 whatever the artifacts'
precision: it is the reference that fp32 graphs must match and that fp16 graphs are measured against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from restok.manifest import ArtifactError, Manifest
from restok.runtime.backend import HostBackend


def load_source_models(manifest: Manifest, device: str = "cpu", reference: tuple | None = None):
    """(tokenizer, generator) in float32 rebuilt from ``manifest.source`` (a preset with seeded weights, the
    bundled model of this install, or checkpoints), or from ``reference`` = (tokenizer path, generator path)
    when the recorded checkpoints moved; the weights must hash to what the export recorded."""
    from restok.checkpoints import load_generator, load_tokenizer
    from restok.export.exporter import state_dict_sha256
    from restok.models.presets import build_generator, build_tokenizer

    src = manifest.source
    kind = src.get("kind")
    if reference is not None:
        tok, gen = load_tokenizer(reference[0], src.get("preset", "L")), load_generator(reference[1], src.get("preset", "L"))
        where = f"{reference[0]} / {reference[1]}"
    elif kind == "preset":
        tok = build_tokenizer(src["preset"], seed=src["tokenizer_seed"])
        gen = build_generator(src["preset"], seed=src["generator_seed"])
        where = f"preset {src['preset']}"
    elif kind == "bundled":
        folder = Path(__file__).parents[1] / "assets" / src.get("model", "tiny")
        tok, gen = load_tokenizer(folder / "tokenizer"), load_generator(folder / "generator")
        where = f"the bundled model ({folder})"
    elif kind == "checkpoint":
        for what in ("tokenizer", "generator"):
            p = Path(src[what])
            if not p.exists():
                raise ArtifactError(f"the reference {what} checkpoint recorded by the export, {p}, is not here; pass the "
                                    "checkpoints with --tokenizer/--generator (they are checked against the recorded hashes)")
        tok, gen = load_tokenizer(src["tokenizer"], src.get("preset", "L")), load_generator(src["generator"], src.get("preset", "L"))
        where = f"{src['tokenizer']} / {src['generator']}"
    else:
        raise ArtifactError("the manifest does not record where its weights came from; re-export with this restok")
    for what, model in (("tokenizer", tok), ("generator", gen)):
        want = src.get(f"{what}_sha256")
        if want and state_dict_sha256(model) != want:
            raise ArtifactError(f"the {what} weights of {where} are not the ones these artifacts were exported from "
                                "(sha256 differs); pass the original checkpoints or re-export")
    return tok.to(device), gen.to(device)


class TorchBackend(HostBackend):
    """The exported modules run eagerly in float32 on the plan's buffers (inputs viewed as tensors, outputs
    copied back), so the reference follows exactly the bindings every other backend follows."""

    name = "torch"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, device: str = "cpu",
                 reference: tuple | None = None, **_):
        super().__init__(folder, manifest, threads)
        import torch

        from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorGraph

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to PyTorch here; use --device cpu")
        tok, gen = load_source_models(manifest, device, reference)
        self.tok, self.gen = tok.float().eval(), gen.float().eval()
        self.modules = {"generator": GeneratorGraph(self.gen, manifest.guided, manifest.kv_cache),
                        "decoder": DecoderGraph(self.tok), "encoder": EncoderGraph(self.tok)}

    def _buffer_dtype(self, dtype: np.dtype) -> np.dtype:
        return np.dtype(np.float32) if dtype.kind == "f" else dtype  # the reference keeps float32 caches

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        ins, outs = self.modules[name].signature()
        args = []
        for t in ins:
            x = torch.from_numpy(np.ascontiguousarray(feeds[t.name])).to(self.device)
            args.append(x.float() if x.is_floating_point() else x)
        with torch.inference_mode():
            res = self.modules[name](*args)
        res = res if isinstance(res, tuple) else (res,)
        return {t.name: r.detach().float().cpu().numpy() if r.is_floating_point() else r.cpu().numpy()
                for t, r in zip(outs, res)}

    def run_pass(self, i: int) -> None:
        p = self.plan.passes[i]
        outs = self._run("generator", self._pass_views(p, outputs=False))
        for name, view in self._pass_views(p, outputs=True).items():
            view[...] = outs[name]
        self._chain_tokens(i)

    def run_graph(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(name, feeds)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._run("decoder", {"tokens": tokens})["images"]
