"""Fuzzing the inputs a user controls: every file of an export and of a checkpoint (truncations, bit flips,
random bytes) and every option of ``restok generate`` (NaN, inf, negative, huge, wrong type, empty). Each
outcome is exit 0 with the clean result, or a non-zero exit with one error line and no traceback; never a
different result with exit 0."""

import json
import shutil

import numpy as np
import torch

from restok.cli import build_parser, main

MUTATIONS = ("truncate", "flip", "random")


def _mutate(path, kind: str, rng: np.random.Generator) -> None:
    b = bytearray(path.read_bytes())
    if kind == "truncate":
        b = b[: int(rng.integers(0, max(len(b), 1)))]
    elif kind == "flip":
        i = int(rng.integers(len(b)))
        b[i] ^= 1 << int(rng.integers(8))
    else:
        start = int(rng.integers(len(b)))
        n = min(64, len(b) - start)
        b[start : start + n] = rng.bytes(n)
    path.write_bytes(bytes(b))


def _run(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    if rc != 0:
        assert "Traceback" not in err, err
        assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    return rc, out, err


def test_damaged_exports(tiny_artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    base = ["generate", "--classes", "1", "2", "--seed", "5"]
    rc, _, _ = _run(base + ["--artifacts", tiny_artifacts, "--out", tmp_path / "clean"], capsys)
    clean = np.load(tmp_path / "clean" / "tokens.npy")
    files = sorted(str(p.relative_to(tiny_artifacts)) for p in tiny_artifacts.rglob("*") if p.is_file()
                   and "polygraphy" not in p.parts)
    assert "manifest.json" in files and "generator/weights.bin" in files
    rng = np.random.default_rng(0)
    outcomes = {}
    for rel in files:
        for kind in MUTATIONS:
            art = tmp_path / f"art_{rel.replace('/', '_')}_{kind}"
            shutil.copytree(tiny_artifacts, art, ignore=shutil.ignore_patterns("polygraphy"))
            _mutate(art / rel, kind, rng)
            out = tmp_path / f"out_{art.name}"
            rc, _, err = _run(base + ["--artifacts", art, "--out", out], capsys)
            if rc == 0:
                assert np.array_equal(np.load(out / "tokens.npy"), clean), (rel, kind)
            outcomes[(rel, kind)] = rc
            shutil.rmtree(art)
    assert all(rc == 2 for rc in outcomes.values()), outcomes  # every damage is caught and called bad input


def test_damaged_checkpoints(tmp_path, tiny_tokenizer, capsys):
    """restok checkpoints record their weights' sha256: any damage is refused before it is used."""
    import restok
    from restok.checkpoints import save_checkpoint

    ck = tmp_path / "tok"
    save_checkpoint(tiny_tokenizer, ck)
    argv = ["evaluate", "tokenizer", "--data", "digits:test", "--json", "-", "--tokenizer"]
    rc, clean, _ = _run(argv + [ck], capsys)
    assert rc == 0
    rng = np.random.default_rng(1)
    for rel in ("model.safetensors", "config.json"):
        for kind in MUTATIONS:
            bad = tmp_path / f"tok_{rel}_{kind}"
            shutil.copytree(ck, bad)
            _mutate(bad / rel, kind, rng)
            rc, out, err = _run(argv + [bad], capsys)
            assert rc == 2 or (rc == 0 and json.loads(out) == json.loads(clean)), (rel, kind, rc, err)
            try:  # the API: refused, or (harmless damage, e.g. a flipped space in config.json) the same weights
                loaded = restok.load_tokenizer(bad)
            except ValueError:
                continue
            ref = tiny_tokenizer.state_dict()
            assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items()), (rel, kind)


def _generate_options():
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None) and "generate" in a.choices)
    p = sub.choices["generate"]
    return [a for a in p._actions if a.option_strings and a.nargs != 0 and a.dest not in ("help", "out", "json",
                                                                                            "artifacts")]


VALUES = ["nan", "inf", "-inf", "-1", "0", "1e30", "123456789012345678901234567890", "abc", ""]


def test_every_generate_option(tiny_artifacts, tmp_path, capsys):
    options = _generate_options()
    assert {"--seed", "--temperature", "--top-p", "--cfg-scale", "--classes", "--threads"} <= {a.option_strings[0]
                                                                                              for a in options}
    runs = 0
    for action in options:
        opt = action.option_strings[0]
        for value in VALUES:
            out = tmp_path / f"o{runs}"
            runs += 1
            rc, _, err = _run(["generate", "--artifacts", tiny_artifacts, "--out", out, f"{opt}={value}"], capsys)
            if rc != 0:
                assert not out.exists() or not any(out.iterdir()), (opt, value)
                continue
            doc = json.loads((out / "summary.json").read_text())  # strict JSON: no NaN could be written
            tokens = np.load(out / "tokens.npy")
            assert tokens.min() >= 0 and tokens.max() < 1024, (opt, value)
            key = action.dest
            if key in doc["sampling"]:
                assert float(doc["sampling"][key]) == float(value), (opt, value)
            assert all(np.isfinite(float(v)) for v in doc["sampling"].values() if not isinstance(v, str))
    assert runs == len(options) * len(VALUES)
