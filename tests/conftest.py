import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_generator():
    from restok.models.presets import build_generator

    return build_generator("tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from restok.models.presets import build_tokenizer

    return build_tokenizer("tiny", seed=0)


# The exported tiny artifacts the tests share, made by the CLI in background processes started right after
# collection (each export is single-threaded Python: two cores run them beside the tests that need none,
# which run first). A fixture waits for its export and fails with the export's log if it failed.
GOLDEN = Path(__file__).parent / "golden"
EXPORTS = {
    # fp32, runs of 1..4 images, guided, with the encoder
    "tiny_artifacts": ["--preset", "tiny", "--max-batch", "4"],
    # the official code's small models (tests/golden) through the whole chain: {base} is the session's folder
    "golden_generator_artifacts": ["--checkpoint", "{base}/golden_gen_ck", "--max-batch", "2", "--no-encoder"],
    "golden_generator_artifacts_inplace": ["--checkpoint", "{base}/golden_gen_ck", "--max-batch", "2", "--no-encoder",
                                           "--kv-cache", "inplace", "--no-concat-fallback"],
    "golden_tokenizer_artifacts": ["--checkpoint", "{base}/golden_tok_ck", "--max-batch", "2"],
    # what make demo ships: the bundled trained model (restok/assets/tiny), default options
    "bundled_artifacts": ["--no-encoder"],
    "tiny_artifacts_fp16": ["--preset", "tiny", "--precision", "fp16", "--no-encoder", "--max-batch", "4"],
    # the in-place KV cache (TensorScatter, opset 24) + its past/present fallback generator
    "tiny_artifacts_inplace": ["--preset", "tiny", "--max-batch", "4", "--kv-cache", "inplace", "--no-encoder"],
}
_EXPORTS: dict = {}  # fixture name -> (process, output folder, log file)


def _exports_of(item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    params = set(map(str, callspec.params.values())) if callspec else set()
    return (names | params) & set(EXPORTS)


def pytest_collection_modifyitems(session, config, items):
    needed = set().union(*(_exports_of(it) for it in items)) if items else set()
    if not needed:
        return
    items.sort(key=lambda it: bool(_exports_of(it)))  # stable: tests that need no export run during the exports
    base = Path(tempfile.mkdtemp(prefix="restok-test-artifacts-"))
    golden_checkpoints(base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, args in EXPORTS.items():
        if name not in needed:
            continue
        out, log = base / name, base / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "restok", "export", *[a.format(base=base) for a in args],
                                     "--out", str(out)], stdout=f, stderr=subprocess.STDOUT, env=env)
        _EXPORTS[name] = (proc, out, log)
    _EXPORTS["_base"] = base


def golden_models():
    """(official tokenizer, official generator) of tests/golden, loaded into restok's models."""
    from safetensors.torch import load_file

    from restok.models import GeneratorConfig, HARGenerator, ResTok, TokenizerConfig

    sd = lambda g: {k[3:]: v for k, v in g.items() if k.startswith("sd.")}  # noqa: E731
    tcfg = TokenizerConfig(image_size=32, codebook_size=1024, enc_width=64, enc_layers=4, enc_heads=4,
                           dec_width=64, dec_layers=4, dec_heads=4, cnn_hidden=32, cnn_channel_mult=(1, 2))
    tok = ResTok(tcfg).eval()
    tok.load_state_dict(sd(load_file(GOLDEN / "official_tokenizer_small.safetensors")), strict=True)
    gen = HARGenerator(GeneratorConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10)).eval()
    gen.load_state_dict(sd(load_file(GOLDEN / "official_generator_small.safetensors")), strict=True)
    return tok, gen


def golden_checkpoints(base: Path) -> None:
    """The official generator with a seeded tokenizer of its vocabulary (golden_gen_ck), and the official
    tokenizer with a seeded generator of its codebook (golden_tok_ck), as restok checkpoint folders."""
    import dataclasses

    from restok.checkpoints import save_checkpoint
    from restok.models import ResTok
    from restok.models.presets import build_generator, randomize_weights_

    tok, gen = golden_models()
    partner_tok = randomize_weights_(ResTok(dataclasses.replace(tok.cfg, codebook_size=512)), 5).eval()
    save_checkpoint(partner_tok, base / "golden_gen_ck" / "tokenizer")
    save_checkpoint(gen, base / "golden_gen_ck" / "generator")
    save_checkpoint(tok, base / "golden_tok_ck" / "tokenizer")
    save_checkpoint(build_generator("tiny", seed=6), base / "golden_tok_ck" / "generator")


def pytest_sessionfinish(session, exitstatus):
    base = _EXPORTS.pop("_base", None)
    for proc, _, _ in _EXPORTS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


def _exported(name: str, tmp_path_factory) -> Path:
    if name not in _EXPORTS:  # collected without the hook's knowledge: export here
        from restok.cli import main

        base = tmp_path_factory.mktemp("artifacts")
        golden_checkpoints(base)
        out = base / name
        assert main(["export", *[a.format(base=base) for a in EXPORTS[name]], "--out", str(out)]) == 0
        return out
    proc, out, log = _EXPORTS[name]
    try:  # under the per-test timeout (600 s), so a stuck export fails here, with its log, not as a timeout
        rc = proc.wait(timeout=540)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"restok export {' '.join(EXPORTS[name])} did not finish in 540 s:\n{log.read_text()[-4000:]}")
    assert rc == 0, f"restok export {' '.join(EXPORTS[name])} failed ({rc}):\n{log.read_text()[-4000:]}"
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """The tiny preset (seeded random weights) exported through the CLI: fp32, max batch 4, guided."""
    return _exported("tiny_artifacts", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_artifacts_fp16(tmp_path_factory):
    return _exported("tiny_artifacts_fp16", tmp_path_factory)


@pytest.fixture(scope="session")
def golden_generator_artifacts(tmp_path_factory):
    return _exported("golden_generator_artifacts", tmp_path_factory)


@pytest.fixture(scope="session")
def golden_generator_artifacts_inplace(tmp_path_factory):
    return _exported("golden_generator_artifacts_inplace", tmp_path_factory)


@pytest.fixture(scope="session")
def golden_tokenizer_artifacts(tmp_path_factory):
    return _exported("golden_tokenizer_artifacts", tmp_path_factory)


@pytest.fixture(scope="session")
def bundled_artifacts(tmp_path_factory):
    return _exported("bundled_artifacts", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_artifacts_inplace(tmp_path_factory):
    """The same model with the in-place KV cache (TensorScatter, opset 24)."""
    return _exported("tiny_artifacts_inplace", tmp_path_factory)
