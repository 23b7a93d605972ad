"""Train the bundled tiny model on the scikit-learn digits, end to end, on a CPU in about half an hour:
tokenizer -> codes -> generator -> evaluation -> restok/assets/tiny/{tokenizer,generator} (fp16 weights).

    python -m restok.training.bundled --out restok/assets/tiny      (make bundled-model)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from restok.fileutil import staged

TOKENIZER = dict(preset="tiny", data="digits", steps=1200, batch_size=32, lr=1e-3, end_lr=5e-5, warmup_steps=50,
                 ema_decay=0.999, log_every=20, save_every=400, sample_every=200, seed=10086)
GENERATOR = dict(preset="tiny", steps=1000, batch_size=64, lr=1e-3, end_lr=5e-5, warmup_steps=100, ema_decay=0.999,
                 log_every=20, save_every=500, sample_every=250, seed=10086)


def _save_fp16(model, path: Path) -> None:
    import copy

    from restok.checkpoints import save_checkpoint

    save_checkpoint(copy.deepcopy(model).half(), path)


def train_bundled(out: Path, work: Path, tok_steps: int | None = None, gen_steps: int | None = None) -> dict:
    import restok
    from restok.training.codes import extract_codes
    from restok.training.data import DigitsDataset
    from restok.training.evaluate import generated_class_accuracy, tokenizer_metrics
    from restok.training.train_generator import GeneratorTrainConfig, train_generator
    from restok.training.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    tcfg = TokenizerTrainConfig(out=str(work / "tokenizer"), **{**TOKENIZER, **({"steps": tok_steps} if tok_steps else {})})
    train_tokenizer(tcfg, resume=True)
    t_tok = time.perf_counter() - t0
    tok_ck = work / "tokenizer" / "checkpoints" / (work / "tokenizer" / "checkpoints" / "latest").read_text() / "tokenizer_ema"
    _save_fp16(restok.load_tokenizer(tok_ck), out / "tokenizer")
    tok = restok.load_tokenizer(out / "tokenizer")  # what ships (fp16-rounded weights)
    extract_codes(tok, DigitsDataset(tok.cfg.image_size, "train"), work / "codes", crops="ten", flip=False)
    gcfg = GeneratorTrainConfig(out=str(work / "generator"), codes=str(work / "codes"), tokenizer=str(out / "tokenizer"),
                                **{**GENERATOR, **({"steps": gen_steps} if gen_steps else {})})
    train_generator(gcfg, resume=True)
    gen_ck = work / "generator" / "checkpoints" / (work / "generator" / "checkpoints" / "latest").read_text() / "generator_ema"
    _save_fp16(restok.load_generator(gen_ck), out / "generator")
    gen = restok.load_generator(out / "generator")

    metrics = {"tokenizer": tokenizer_metrics(tok, DigitsDataset(tok.cfg.image_size, "test"))}

    def images(labels):
        ids = restok.generate(gen, labels, seed=0)  # the paper's settings: SamplingParams()
        return tok.decode(ids).numpy()

    metrics["generation"] = generated_class_accuracy(images, 10, 20)
    metrics["seconds"] = {"tokenizer": round(t_tok, 1), "total": round(time.perf_counter() - t0, 1)}
    metrics["configs"] = {"tokenizer": TOKENIZER, "generator": GENERATOR}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "assets" / "tiny"), help="where the model goes")
    p.add_argument("--work", default="runs/bundled", help="training runs (checkpoints, metrics, samples)")
    p.add_argument("--tokenizer-steps", type=int, default=None)
    p.add_argument("--generator-steps", type=int, default=None)
    a = p.parse_args(argv)
    # the old model stays until the new one is complete
    with staged(a.out, owned=lambda d: [str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()]) as stage:
        m = train_bundled(stage, Path(a.work), a.tokenizer_steps, a.generator_steps)
    print(json.dumps({k: v for k, v in m.items() if k != "configs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
