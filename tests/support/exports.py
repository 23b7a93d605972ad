"""The exported artifacts the tests share (``tiny_artifacts``, ``golden_*_artifacts``, ``bundled_artifacts``,
...), each made once per session by ``restok export``. Registered from tests/conftest.py.

Why a prefetch and an ordering: the test machines have 2 CPU cores, and an export is single-threaded Python
that takes a while. So, once the session knows which tests it will run (after -k, -m and --deselect), this
plugin starts one background ``restok export`` for each artifact fixture that a selected test needs, and
moves the tests that need no export to the front: they run on the other core while the exports proceed. An
artifact fixture then waits for its export, and fails with the export's log if the export failed.

Only what the selected tests need is started: an export that no selected test uses is not run, the golden
checkpoints (tests/golden written as restok checkpoint folders) are written only when a golden export is
needed, and --collect-only starts nothing.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parents[1] / "golden"
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


def _needs_golden(names) -> bool:
    """Whether any of these exports reads the golden checkpoints ({base}/golden_*_ck)."""
    return any("{base}" in a for name in names for a in EXPORTS[name])


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have removed what will not run
def pytest_collection_modifyitems(session, config, items):
    if any(_exports_of(it) for it in items):
        items.sort(key=lambda it: bool(_exports_of(it)))  # stable: tests that need no export run during the exports


def pytest_collection_finish(session):
    """Start the exports the selected tests need (session.items is final here: after every plugin's selection)."""
    needed = set().union(*(_exports_of(it) for it in session.items)) if session.items else set()
    if not needed or session.config.option.collectonly:
        return
    base = Path(tempfile.mkdtemp(prefix="restok-test-artifacts-"))
    if _needs_golden(needed):
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
        if _needs_golden([name]):
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
