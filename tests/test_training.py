"""Training: losses go down, resume is exact, 2 processes (gloo) equal 1 at the same global batch, code
shards round-trip and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from restok.training.codes import extract_codes
from restok.training.data import CodesDataset, DigitsDataset
from restok.training.train_generator import GeneratorTrainConfig, train_generator
from restok.training.train_tokenizer import TokenizerTrainConfig, train_tokenizer


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _tok_cfg(out, **kw):
    base = dict(out=str(out), preset="tiny", data="digits", steps=12, batch_size=8, lr=1e-3, warmup_steps=2,
                ema_decay=0.99, log_every=1, save_every=100, sample_every=0, seed=3)
    return TokenizerTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("codes")
    data = DigitsDataset(32, "train")
    data.raw, data.labels = data.raw[:40], data.labels[:40]
    extract_codes(tiny_tokenizer, data, out, crops="ten", flip=False, batch_size=16, shard_size=16, progress=False)
    return out


def _gen_cfg(out, codes, **kw):
    base = dict(out=str(out), codes=str(codes), preset="tiny", steps=12, batch_size=8, lr=1e-3, warmup_steps=2,
                ema_decay=0.99, log_every=1, save_every=100, sample_every=0, seed=5)
    return GeneratorTrainConfig(**{**base, **kw})


def test_tokenizer_loss_decreases_and_checkpoint_loads(tmp_path):
    train_tokenizer(_tok_cfg(tmp_path))
    m = _metrics(tmp_path)
    assert m[11]["loss"] < 0.5 * m[0]["loss"]
    import restok

    tok = restok.load_tokenizer(tmp_path / "checkpoints" / "step_0000011" / "tokenizer_ema")
    assert tok.cfg.image_size == 32 and (tmp_path / "checkpoints" / "latest").read_text() == "step_0000011"


def test_generator_loss_decreases(tmp_path, codes_dir):
    train_generator(_gen_cfg(tmp_path, codes_dir))
    m = _metrics(tmp_path)
    assert m[11]["loss"] < m[0]["loss"] - 0.5


@pytest.mark.parametrize("which", ["tokenizer", "generator"])
def test_resume_is_exact(tmp_path, codes_dir, which):
    mk = (lambda o, **k: _tok_cfg(o, steps=8, **k)) if which == "tokenizer" else (lambda o, **k: _gen_cfg(o, codes_dir, steps=8, **k))
    run = train_tokenizer if which == "tokenizer" else train_generator
    run(mk(tmp_path / "straight"))
    run(mk(tmp_path / "split", stop_at=4))
    assert max(_metrics(tmp_path / "split")) == 4
    run(mk(tmp_path / "split"), resume=True)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    for s in range(5, 8):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-6, abs=1e-7), s


def test_two_processes_match_one(tmp_path, codes_dir):
    """torchrun --nproc_per_node 2 (gloo on the CPU) against one process at the same global batch.
    Elementwise dropout draws from each process's RNG, so it is switched off here; per-sample choices
    (class dropout, crops) are seeded per sample and stay on."""
    model = json.dumps({"token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0})
    common = ["steps=4", "batch_size=8", "log_every=1", "save_every=100", "sample_every=0", f"codes={codes_dir}",
              "preset=tiny", "lr=1e-3", "warmup_steps=1", f"model={model}", "class_dropout=0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    one = subprocess.run([sys.executable, "-m", "restok", "train", "generator", f"out={tmp_path / 'one'}", *common],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), "-m", "restok", "train", "generator",
                          f"out={tmp_path / 'two'}", *common], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for s in range(4):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5), s
    import restok

    wa = restok.load_generator(tmp_path / "one" / "checkpoints" / "step_0000003" / "generator").state_dict()
    wb = restok.load_generator(tmp_path / "two" / "checkpoints" / "step_0000003" / "generator").state_dict()
    # Adam divides by sqrt(v): parameters with near-zero gradients amplify the rounding differences of the
    # all-reduce, so individual entries may differ by a fraction of one update (lr 1e-3); the whole agrees
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa])
    norm = torch.cat([wa[k].flatten() for k in wa])
    assert diff.abs().max().item() < 3e-4 and (diff.norm() / norm.norm()).item() < 1e-5


def test_code_shards_round_trip_and_resume(tmp_path, tiny_tokenizer, codes_dir):
    ds = CodesDataset(codes_dir)
    meta = json.loads((codes_dir / "index.json").read_text())
    assert len(ds) == 40 and [s["count"] for s in meta["shards"]] == [16, 16, 8] and meta["crops"] == 5
    # the centre crop (index 4) equals tokenizing the resized image directly
    data = DigitsDataset(32, "train")
    from restok.training.data import _pil_to_array, crops_for_codes

    x = torch.from_numpy(np.stack([_pil_to_array(crops_for_codes(data.pil(i), 32, "ten", False)[4]) for i in range(3)]))
    assert np.array_equal(ds.codes[:3, 4].astype(np.int64), tiny_tokenizer.encode(x).numpy())
    assert np.array_equal(ds.labels, data.labels[:40])
    # an interrupted run: the last shard is missing from the index -> a rerun writes only that one
    import shutil

    part = tmp_path / "part"
    shutil.copytree(codes_dir, part)
    meta["shards"] = meta["shards"][:2]
    (part / "index.json").write_text(json.dumps(meta))
    (part / "shard_00002.npz").unlink()
    d40 = DigitsDataset(32, "train")
    d40.raw, d40.labels = d40.raw[:40], d40.labels[:40]
    extract_codes(tiny_tokenizer, d40, part, crops="ten", flip=False, batch_size=16, shard_size=16, progress=False)
    again = CodesDataset(part)
    assert np.array_equal(again.codes, ds.codes)
    with pytest.raises(ValueError, match="another tokenizer or settings"):
        extract_codes(tiny_tokenizer, d40, part, crops="center", flip=False, shard_size=16, progress=False)


class _VF(torch.nn.Module):
    """A stand-in frozen encoder: (cls [B, 16], patch map [B, 16, 4, 4])."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)

    def forward(self, x):
        p = self.conv(x)
        return p.mean(dim=(2, 3)), p


class _Perceptual(torch.nn.Module):
    def forward(self, a, b):
        return ((a - b) ** 2).flatten(1).mean(1)


def test_optional_losses_run(tmp_path):
    torch.manual_seed(0)
    vf, pc = tmp_path / "vf.pt", tmp_path / "perc.pt"
    torch.jit.script(_VF()).save(str(vf))
    torch.jit.script(_Perceptual()).save(str(pc))
    cfg = _tok_cfg(tmp_path / "run", steps=3, vf_model=str(vf), vf_feature_dim=16, gan_start=1,
                   perceptual_model=str(pc), save_every=3)
    train_tokenizer(cfg)
    m = _metrics(tmp_path / "run")
    assert {"vf", "perceptual"} <= set(m[0]) and "gan" not in m[0]
    assert {"gan", "disc", "vf"} <= set(m[2])
    import restok

    tok = restok.load_tokenizer(tmp_path / "run" / "checkpoints" / "step_0000002" / "tokenizer")
    assert tok.cfg.vf_feature_dim == 16 and hasattr(tok, "vf_proj")
