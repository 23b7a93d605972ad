"""Training (restok.training): losses go down, resume after SIGKILL is exact, 2 processes (gloo) equal 1 at the
same global batch, a finished run is not overwritten, trainer state runs no code, the optional losses run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from restok.training.train_generator import GeneratorTrainConfig, train_generator
from restok.training.train_tokenizer import TokenizerTrainConfig, train_tokenizer
from tests.support.cli import ENV
from tests.support.net import free_port


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _tok_cfg(out, **kw):
    base = dict(out=str(out), preset="tiny", data="digits", steps=12, batch_size=8, lr=1e-3, warmup_steps=2,
                ema_decay=0.99, log_every=1, save_every=100, sample_every=0, seed=3)
    return TokenizerTrainConfig(**{**base, **kw})


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


def _final_state(out: Path, which: str) -> dict:
    """Model, EMA, optimizer state and trainer extras of a run's last checkpoint."""
    import restok
    from restok.training.common import checkpoints, load_trainer_state

    ck = checkpoints(out)[-1]
    load = restok.load_tokenizer if which == "tokenizer" else restok.load_generator
    st = load_trainer_state(ck)
    return {"step": st["step"], "model": load(ck / which).state_dict(), "ema": load(ck / f"{which}_ema").state_dict(),
            "optimizer": st["model_optimizer"], "disc": st.get("disc"), "disc_optimizer": st.get("disc_optimizer"),
            "grad_scaler": st.get("grad_scaler")}


def _assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, path


@pytest.mark.parametrize("which", ["tokenizer", "generator"])
def test_resume_after_sigkill_is_exact(tmp_path, codes_dir, which):
    """A training process killed with SIGKILL mid-run, then resumed, ends with exactly the model, EMA and
    optimizer state (and the discriminator's) of a run that was never interrupted."""
    import signal
    import time

    if which == "tokenizer":
        common = ["data=digits", "gan_start=2", "ema_decay=0.9"]
    else:
        common = [f"codes={codes_dir}", "ema_decay=0.9", "class_dropout=0.3"]
    common += ["preset=tiny", "steps=10", "batch_size=8", "lr=1e-3", "warmup_steps=2", "log_every=1", "save_every=2",
               "sample_every=0", "seed=3", "keep=10"]
    cmd = [sys.executable, "-m", "restok", "train", which]
    straight = subprocess.run(cmd + [f"out={tmp_path / 'straight'}", *common], env=ENV, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    p = subprocess.Popen(cmd + [f"out={out}", *common], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_0000005").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    (out / "checkpoints" / "latest").unlink(missing_ok=True)  # resume must not depend on it
    resumed = subprocess.run(cmd + [f"out={out}", *common, "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _final_state(tmp_path / "straight", which), _final_state(out, which)
    assert a["step"] == b["step"] == 9
    _assert_same(a, b)
    if which == "tokenizer":
        assert a["disc"] is not None and a["disc_optimizer"]["state"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(10))  # no step logged twice


def test_fp16_resume_keeps_the_loss_scale(tmp_path, codes_dir):
    """fp16 trains with a GradScaler: its loss scale and growth count are saved with the optimizer and a
    resume goes on from them (a fresh scaler restarts at 2^16 with its count at 0): 1 step, then a resume
    to 2, end exactly where 2 straight steps end."""
    cfg = lambda out, **kw: _gen_cfg(out, codes_dir, steps=2, precision="fp16", save_every=1, keep=10, **kw)  # noqa: E731
    train_generator(cfg(tmp_path / "straight"))
    train_generator(cfg(tmp_path / "resumed", stop_at=0))
    train_generator(cfg(tmp_path / "resumed"), resume=True)
    a, b = _final_state(tmp_path / "straight", "generator"), _final_state(tmp_path / "resumed", "generator")
    assert a["step"] == b["step"] == 1 and a["grad_scaler"]["_growth_tracker"] == 2, a["grad_scaler"]
    _assert_same(a, b)


def test_new_run_refuses_an_existing_run(tmp_path, capsys):
    from restok.cli import main

    train_tokenizer(_tok_cfg(tmp_path, steps=2, save_every=1))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    rc = main(["train", "tokenizer", f"out={tmp_path}", "preset=tiny", "data=digits", "steps=2", "batch_size=8"])
    assert rc == 2 and "already holds a training run (checkpoints up to step 1)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert main(["train", "tokenizer", f"out={tmp_path}", "preset=tiny", "data=digits", "steps=1", "batch_size=8",
                 "save_every=1", "--overwrite"]) == 0
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_0000000"]


def test_trainer_state_runs_no_code(tmp_path, capsys):
    """trainer.pt is read with weights_only=True: a crafted pickle is refused and runs nothing."""
    import pickle

    from restok.cli import main

    train_tokenizer(_tok_cfg(tmp_path, steps=2, save_every=1))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = tmp_path / "checkpoints" / "step_0000001"
    with open(ck / "trainer.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Evil()}, f)
    rc = main(["train", "tokenizer", f"out={tmp_path}", "preset=tiny", "data=digits", "steps=3", "batch_size=8", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be read as restok trainer state" in err and "Traceback" not in err
    assert not marker.exists()
    (ck / "trainer.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "tokenizer", f"out={tmp_path}", "preset=tiny", "data=digits", "steps=3", "batch_size=8",
                 "--resume"]) == 2
    assert f"remove {ck}" in capsys.readouterr().err


def test_two_processes_match_one(tmp_path, codes_dir):
    """torchrun --nproc_per_node 2 (gloo on the CPU) against one process at the same global batch: two ranks
    ran, each on its half of every global batch, and the final weights and EMA equal the single process's.
    Elementwise dropout draws from each process's RNG, so it is switched off here; per-sample choices
    (class dropout, crops) are seeded per sample and stay on."""
    model = json.dumps({"token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0})
    common = ["steps=4", "batch_size=8", "log_every=1", "save_every=100", "sample_every=0", f"codes={codes_dir}",
              "preset=tiny", "lr=1e-3", "warmup_steps=1", f"model={model}", "class_dropout=0.3", "ema_decay=0.9",
              "trace_samples=true"]
    one = subprocess.run([sys.executable, "-m", "restok", "train", "generator", f"out={tmp_path / 'one'}", *common],
                         env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "restok", "train", "generator",
                          f"out={tmp_path / 'two'}", *common], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    traces = {r: [json.loads(line) for line in (tmp_path / "two" / f"samples_rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)}
    for step in range(4):
        r0, r1 = traces[0][step], traces[1][step]
        assert r0["world"] == r1["world"] == 2 and r0["step"] == r1["step"] == step
        assert r0["positions"] == list(range(4)) and r1["positions"] == list(range(4, 8))  # each its half
    solo = [json.loads(line) for line in (tmp_path / "one" / "samples_rank0.jsonl").read_text().splitlines()]
    assert all(t["world"] == 1 and t["positions"] == list(range(8)) for t in solo)
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for s in range(4):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5), s
    sa, sb = _final_state(tmp_path / "one", "generator"), _final_state(tmp_path / "two", "generator")
    # Adam divides by sqrt(v): parameters with near-zero gradients amplify the rounding differences of the
    # all-reduce, so individual entries may differ by a fraction of one update (lr 1e-3); the whole agrees
    for part in ("model", "ema"):
        wa, wb = sa[part], sb[part]
        diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa])
        norm = torch.cat([wa[k].flatten() for k in wa])
        assert diff.abs().max().item() < 3e-4 and (diff.norm() / norm.norm()).item() < 1e-5, part
        moved = torch.cat([(wa[k] - sa["model"][k]).flatten() for k in wa]) if part == "ema" else None
        assert moved is None or moved.abs().max() > 0  # the EMA is not just a copy of the weights


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
