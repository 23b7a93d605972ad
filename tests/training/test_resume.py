"""A resumed run must compute what the checkpointed run would have: ``restok train ... --resume`` refuses settings or
data that differ from the checkpoint's (one line naming each, with both values) unless --resume-override names
them; settings that do not change results are free; old checkpoints without a data fingerprint are refused clearly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from restok.cli import main
from restok.training.common import RESUME_FREE, TRAINER_STATE, checkpoints, load_config, load_trainer_state
from restok.training.train_generator import GeneratorTrainConfig, train_generator
from restok.training.train_tokenizer import TokenizerTrainConfig, train_tokenizer
from tests.support.cli import one_line_error

# one step (checkpoint step_0000000): a resume with these settings has nothing left to train, so it costs little
TOK = ["preset=tiny", "data=digits", "steps=1", "batch_size=8", "lr=1e-3", "warmup_steps=1", "ema_decay=0.9",
       "log_every=1", "save_every=100", "sample_every=0", "seed=3"]


def _cfg(cls, args: list[str]):
    return load_config(cls, None, args)


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(["train", *args])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "run"
    train_tokenizer(_cfg(TokenizerTrainConfig, [f"out={out}", *TOK]))
    return out


@pytest.fixture
def run(tok_run, tmp_path) -> Path:
    """A copy of the one-step tokenizer run (a resume rewrites metrics.jsonl)."""
    return Path(shutil.copytree(tok_run, tmp_path / "run"))


def test_resume_refuses_changed_settings(run, capsys):
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "batch_size=16", "lr=2e-3", "seed=4", "steps=2",
                   'model={"drop_prob": 0.1}', "precision=bf16", "--resume")
    assert rc == 2, err
    one_line_error(err)
    for said in ("batch_size was 8, now 16", "lr was 0.001, now 0.002", "seed was 3, now 4", "steps was 1, now 2",
                 'model was {}, now {"drop_prob": 0.1}', 'precision was "auto", now "bf16"'):
        assert said in err
    assert "or allow the change with --resume-override model steps batch_size lr precision seed" in err
    assert "resumed from" not in err and "data_content" not in err
    # the same through the Python API: a ValueError
    with pytest.raises(ValueError, match="ema_decay was 0.9, now 0.5"):
        train_tokenizer(_cfg(TokenizerTrainConfig, [f"out={run}", *TOK, "ema_decay=0.5"]), resume=True)
    # settings that do not change results are free
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "log_every=5", "save_every=7", "keep=3", "workers=2",
                   "stop_at=9", "trace_samples=true", "device=cpu", "--resume")
    assert rc == 0 and "resumed from" in err and "allowed" not in err, err
    # --resume-override allows exactly the named ones (the KEY=VALUE words after it are still config overrides)
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "--resume", "--resume-override", "lr", "lr=2e-3", "seed=4")
    assert rc == 2 and "seed was 3, now 4" in err and "lr was" not in err, err
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "--resume", "--resume-override", "lr,seed", "lr=2e-3",
                   "seed=4")
    assert rc == 0 and "(allowed: lr was 0.001, now 0.002; seed was 3, now 4)" in err, err


def test_resume_override_names_are_checked(tmp_path, capsys):
    never = tmp_path / "never"  # no run is made: the names are checked first
    for names, said in ((["lrr"], "'lrr' is not a setting compared on resume; the compared ones are: preset"),
                        (["keep"], "'keep' is never compared on resume"),
                        (["codes_content"], "'codes_content' is not a setting")):
        rc, err = _cli(capsys, "tokenizer", f"out={never}", *TOK, "--resume", "--resume-override", *names)
        assert rc == 2 and said in err, err
        one_line_error(err)
    rc, err = _cli(capsys, "generator", f"out={never}", "--resume", "--resume-override", "codes_content", "codes=none")
    assert rc == 2 and "codes_content" not in err, err  # a known name: it fails later, on the missing codes
    rc, err = _cli(capsys, "tokenizer", f"out={never}", *TOK, "--resume-override", "lr")
    assert rc == 2 and "--resume-override applies only with --resume" in err
    with pytest.raises(ValueError, match="'lrr' is not a setting"):
        train_tokenizer(TokenizerTrainConfig(out=str(never)), resume=True, resume_override=["lrr"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert not never.exists()
    assert all(name in help_text for name in RESUME_FREE) and "data_content" in help_text


def test_old_checkpoint_without_data_fingerprint(run, capsys):
    """A checkpoint written before the data fingerprint was recorded: refused with a message that says so and
    names the override; its settings are still compared (config.json)."""
    ck = checkpoints(run)[-1]
    st = load_trainer_state(ck)
    assert st["fingerprints"]["data_content"].startswith("scikit-learn digits, 1500 images, sha256 ")
    del st["fingerprints"]
    torch.save(st, ck / TRAINER_STATE)
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "--resume")
    assert rc == 2 and "data_content was not recorded (the checkpoint was written before restok recorded it)" in err
    assert "--resume-override data_content" in err
    one_line_error(err)
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "lr=2e-3", "--resume", "--resume-override", "data_content")
    assert rc == 2 and "lr was 0.001, now 0.002" in err and "data_content" not in err, err
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "--resume", "--resume-override", "data_content")
    assert rc == 0 and "resumed from" in err, err
    (ck / "config.json").unlink()
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, "--resume", "--resume-override", "data_content")
    assert rc == 2 and "config.json is missing or unreadable" in err, err


def test_override_of_the_architecture_is_a_clear_error(run, capsys):
    rc, err = _cli(capsys, "tokenizer", f"out={run}", *TOK, 'model={"codebook_size": 512}', "--resume",
                   "--resume-override", "model")
    assert rc == 2 and "does not fit the model of this config" in err, err
    one_line_error(err)


def _folder(root: Path, n: int = 8) -> Path:
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (30 * i, 255 - 30 * i, 100)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_resume_compares_data_content(tmp_path, capsys):
    """The data's content (names and sizes), not only its path: files added or rewritten are refused, a moved
    folder with the same files is the same data."""
    data, out = _folder(tmp_path / "imgs"), tmp_path / "run"
    args = [f"out={out}", *[a for a in TOK if not a.startswith("data=")]]
    train_tokenizer(_cfg(TokenizerTrainConfig, [*args, f"data=folder:{data}"]))
    Image.new("RGB", (32, 32), "red").save(data / "c0" / "new.png")
    rc, err = _cli(capsys, "tokenizer", *args, f"data=folder:{data}", "--resume")
    assert rc == 2 and "data_content was \"8 images, " in err and "now \"9 images, " in err, err
    assert "data was" not in err and "--resume-override data_content" in err
    (data / "c0" / "new.png").unlink()
    Image.new("RGB", (48, 48), "red").save(data / "c1" / "1.png")  # same name, other content
    rc, err = _cli(capsys, "tokenizer", *args, f"data=folder:{data}", "--resume")
    assert rc == 2 and "data_content was \"8 images, " in err and "now \"8 images, " in err, err
    _folder(data)  # as it was
    moved = Path(shutil.move(data, tmp_path / "moved"))
    rc, err = _cli(capsys, "tokenizer", *args, f"data=folder:{moved}", "--resume")
    assert rc == 2 and f'data was "folder:{data}", now "folder:{moved}"' in err and "data_content" not in err, err
    rc, err = _cli(capsys, "tokenizer", *args, f"data=folder:{moved}", "--resume", "--resume-override", "data")
    assert rc == 0 and "resumed from" in err, err


def test_generator_resume_compares_codes(tmp_path, codes_dir, capsys):
    out = tmp_path / "run"
    args = [f"out={out}", "preset=tiny", "steps=1", "batch_size=8", "lr=1e-3", "warmup_steps=1", "ema_decay=0.9",
            "log_every=1", "save_every=100", "sample_every=0", "seed=5"]
    train_generator(_cfg(GeneratorTrainConfig, [*args, f"codes={codes_dir}"]))
    copy = Path(shutil.copytree(codes_dir, tmp_path / "codes"))
    rc, err = _cli(capsys, "generator", *args, f"codes={copy}", "class_dropout=0.5", "--resume")
    assert rc == 2 and "codes was" in err and "class_dropout was -1.0, now 0.5" in err, err
    assert "codes_content" not in err  # the same codes, elsewhere
    meta = json.loads((copy / "index.json").read_text())
    meta["crop_mode"] = "center"  # other codes (a rerun of extract-codes with other settings)
    (copy / "index.json").write_text(json.dumps(meta))
    rc, err = _cli(capsys, "generator", *args, f"codes={copy}", "--resume", "--resume-override", "codes")
    assert rc == 2 and "codes_content was \"40 coded images, " in err and "--resume-override codes_content" in err, err
    one_line_error(err)
    rc, err = _cli(capsys, "generator", *args, f"codes={codes_dir}", "tokenizer=unused", "--resume")
    assert rc == 0 and "resumed from" in err, err
