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
from restok.runtime.backend import Backend


def load_source_models(manifest: Manifest, device: str = "cpu"):
    """(tokenizer, generator) in float32 rebuilt from ``manifest.source``; weights verified by hash."""
    from restok.checkpoints import load_generator, load_tokenizer
    from restok.export.exporter import state_dict_sha256
    from restok.models.presets import build_generator, build_tokenizer

    src = manifest.source
    kind = src.get("kind")
    if kind == "preset":
        tok = build_tokenizer(src["preset"], seed=src["tokenizer_seed"])
        gen = build_generator(src["preset"], seed=src["generator_seed"])
    elif kind == "checkpoint":
        tok = load_tokenizer(src["tokenizer"])
        gen = load_generator(src["generator"])
    else:
        raise ArtifactError("the manifest does not record where its weights came from; re-export with this restok")
    for what, model in (("tokenizer", tok), ("generator", gen)):
        want = src.get(f"{what}_sha256")
        if want and state_dict_sha256(model) != want:
            raise ArtifactError(
                f"the {what} weights at the export's source ({src.get(what) or src.get('preset')}) changed since "
                "the export; re-export the artifacts"
            )
    return tok.to(device), gen.to(device)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, folder: Path, manifest: Manifest, threads: int | None = None, device: str = "cpu", **_):
        super().__init__(folder, manifest, threads)
        import torch

        from restok.export.modules import DecoderGraph, EncoderGraph, GeneratorStepGraph

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        tok, gen = load_source_models(manifest, device)
        self.tok, self.gen = tok.float().eval(), gen.float().eval()
        sched = self.gen.schedule
        self.steps = [GeneratorStepGraph(self.gen, sched, i, manifest.guided, manifest.kv_cache)
                      for i in range(sched.num_steps)]
        self.decoder = DecoderGraph(self.tok)
        self.encoder = EncoderGraph(self.tok)
        self.outputs: list[tuple] = [()] * len(self.steps)
        self._inputs = None

    def _t(self, a, dtype=None):
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t if dtype is None else t.to(dtype)

    def set_inputs(self, labels, noise, cfg_scales, temperature, top_k, top_p) -> None:
        torch = self.torch
        sched = self.gen.schedule
        self._inputs = {
            "labels": self._t(labels),
            "noise": [self._t(noise[:, s.predicts[0] : s.predicts[-1] + 1]) for s in sched.steps],
            "cfg": [torch.tensor([float(c)], device=self.device) for c in cfg_scales],
            "temperature": torch.tensor([float(temperature)], device=self.device),
            "top_k": torch.tensor([int(top_k)], device=self.device),
            "top_p": torch.tensor([float(top_p)], device=self.device),
        }

    def step_args(self, i: int) -> tuple:
        """The inputs of pass i, in graph order, chained from pass i-1's outputs (caches or past/present)."""
        x = self._inputs
        first = x["labels"] if i == 0 else self.outputs[i - 1][0]
        if i > 0:
            past = self.outputs[i - 1][2:]
        elif self.manifest.kv_cache == "inplace":
            past = tuple(self.torch.zeros(t.shape, dtype=self.torch.float32, device=self.device)
                         for t in self.manifest.step_graph(0).inputs if t.name.startswith("cache_"))
        else:
            past = ()
        return (first, x["noise"][i], x["cfg"][i], x["temperature"], x["top_k"], x["top_p"], *past)

    def run_step(self, i: int) -> None:
        with self.torch.inference_mode():
            self.outputs[i] = self.steps[i](*self.step_args(i))
        if self.device.type == "cuda":  # the pass is timed by the caller: wait for the GPU
            self.torch.cuda.synchronize(self.device)

    def step_tokens(self, i: int) -> np.ndarray:
        return self.outputs[i][0].cpu().numpy()

    def step_logits(self, i: int) -> np.ndarray:
        return self.outputs[i][1].float().cpu().numpy()

    def step_present(self, i: int) -> list[np.ndarray]:
        return [t.cpu().numpy() for t in self.outputs[i][2:]]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.decoder(self._t(tokens)).cpu().numpy()

    def encode(self, images: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.encoder(self._t(images, self.torch.float32)).cpu().numpy()
