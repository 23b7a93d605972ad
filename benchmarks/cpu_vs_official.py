"""restok's CPU configurations against the official PyTorch code, side by side in one process, end to end
(HAR generation with CFG + decoding), interleaved runs, medians and paired ratios.

The official code (github Kwai-Kolors/ResTok) is never part of restok: check it out beside the project and
give its work tree with --official; timm imports torchvision, which does not install beside the CPU torch
wheel, so --stub names a folder with a ``tv_stub.py`` whose ``install()`` stands in for it. The official
model gets random weights with a randomised output head (its initialisation zeroes it: every logit 0);
restok's exports are of ``--preset L`` random weights, so the two compute the same shapes, not the same
images. Needs: omegaconf, einops, timm (pip install --no-deps timm), and openvino for the OpenVINO rows.

    restok export --preset L --out /tmp/L
    restok calibrate --artifacts /tmp/L --precision int8-dynamic --out /tmp/L_int8dyn
    python benchmarks/cpu_vs_official.py --official /tmp/ResTok --stub ../shared/tools \\
        --fp32 /tmp/L --int8-dynamic /tmp/L_int8dyn --openvino --batch 1 --runs 5 --json cpu_b1.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from report import report

from restok.runtime import Pipeline, SamplingParams
from restok.schedule import HARSchedule

LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
OFFICIAL_CONFIG = "configs/infer/ResTok/llamagen_l_c2i_restok_l_128.yaml"


def official_generate(official: Path, stub: Path, labels: list[int], schedule: HARSchedule, sampling: SamplingParams):
    """The official tokenizer + GPT-L HAR, random weights, run over restok's schedule with restok's sampling
    settings (the paper's defaults: CFG 3.75 with the step schedule, top-p 0.95) -> a function that generates
    and decodes ``labels``."""
    sys.path[:0] = [str(official), str(stub)]
    import tv_stub

    tv_stub.install()
    from demo_util import get_llamagen_generator, get_restok_tokenizer
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(official / OFFICIAL_CONFIG)
    cfg.experiment.tokenizer_checkpoint = None
    cfg.experiment.generator_checkpoint = None
    tok, gen = get_restok_tokenizer(cfg), get_llamagen_generator(cfg)
    torch.nn.init.normal_(gen.output.weight, std=0.02)
    cond = torch.tensor(labels)

    def run():
        with torch.no_grad():
            ids = gen.generate(condition=cond, num_sample_steps=schedule.num_latent_tokens,
                               guidance_scale=sampling.cfg_scale, guidance_decay=sampling.cfg_schedule,
                               cfg_schedule_kwargs={"window_start": sampling.cfg_start, "min_cfg_scale": 1.0,
                                                    "num_steps": schedule.num_steps},
                               top_p=sampling.top_p, randomize_temperature=sampling.temperature)
            return tok.decode_tokens(ids.view(ids.shape[0], -1))
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="work tree of Kwai-Kolors/ResTok")
    ap.add_argument("--stub", type=Path, required=True, help="folder with tv_stub.py")
    ap.add_argument("--fp32", required=True, help="restok export of --preset L (fp32)")
    ap.add_argument("--int8-dynamic", help="its int8-dynamic calibration (restok calibrate)")
    ap.add_argument("--openvino", action="store_true", help="add OpenVINO bf16 on the fp32 export")
    ap.add_argument("--batch", type=int, default=1, choices=range(1, len(LABELS) + 1), metavar="1..8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: all cores)")
    ap.add_argument("--require", type=float, help="exit 1 unless restok's fastest row is this many times faster "
                    "than the official code (issue 15 asked 3); every row here passes the quality gate on the "
                    "bundled model (restok check)")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args()
    if not (a.official / OFFICIAL_CONFIG).exists():
        raise SystemExit(f"{a.official} is not a ResTok work tree: {OFFICIAL_CONFIG} is missing")
    if not (a.stub / "tv_stub.py").exists():
        raise SystemExit(f"no tv_stub.py in {a.stub}")
    if a.threads:
        torch.set_num_threads(a.threads)
    labels = LABELS[: a.batch]
    pipes = {"restok onnxruntime fp32": Pipeline(a.fp32, threads=a.threads)}
    if a.int8_dynamic:
        pipes["restok onnxruntime int8-dynamic"] = Pipeline(a.int8_dynamic, threads=a.threads)
    if a.openvino:
        pipes["restok openvino bf16"] = Pipeline(a.fp32, "openvino", threads=a.threads, compute_precision="bf16")
    sampling = SamplingParams()
    official = official_generate(a.official, a.stub, labels, pipes["restok onnxruntime fp32"].schedule, sampling)
    runs = {"official": official, **{name: (lambda p=p: p.generate(labels, sampling, seed=0)) for name, p in pipes.items()}}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(a.runs + 1):  # the first round warms up
        for name, fn in runs.items():
            gc.collect()
            time.sleep(0.5)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r:
                seconds[name].append(dt)
            print(f"run {r} {name}: {dt:.3f} s", file=sys.stderr, flush=True)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    out = {"batch": a.batch, "runs": a.runs, "torch_threads": torch.get_num_threads(),
           "median_seconds": med,
           "speedup_vs_official": {k: med["official"] / v for k, v in med.items()},
           "paired_speedup_vs_official": {k: float(np.median([o / x for o, x in zip(seconds["official"], v)]))
                                          for k, v in seconds.items()},
           "speedup_vs_restok_fp32": {k: med["restok onnxruntime fp32"] / v for k, v in med.items()}}
    best = max((k for k in med if k != "official"), key=lambda k: out["speedup_vs_official"][k])
    out["fastest"] = best
    report(out, a.json, a.require is None or out["speedup_vs_official"][best] >= a.require)


if __name__ == "__main__":
    main()
