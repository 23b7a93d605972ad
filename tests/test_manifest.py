"""The manifest (restok.manifest) every file of an export is checked against: a missing graph, truncated
weights, a changed byte (even with its mtime kept), an older schema and a hand-edited manifest are refused
with an error that names the file or the command to run."""

import json
import os
import shutil

import pytest

from restok.manifest import ArtifactError, Manifest
from restok.runtime import Pipeline


@pytest.fixture
def damaged(tiny_artifacts, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, d)
    return d


def test_missing_graph(damaged):
    (damaged / "generator" / "generator.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"generator\.onnx is missing"):
        Manifest.read(damaged)


def test_truncated_weights(damaged):
    w = damaged / "generator" / "weights.bin"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=r"weights\.bin has 1000 bytes"):
        Pipeline(damaged)


def test_hash_mismatch(damaged):
    p = damaged / "tokenizer" / "decoder.onnx"
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(ArtifactError, match=r"decoder\.onnx does not match the sha256"):
        Manifest.read(damaged)


def test_previous_schema_is_refused_with_the_command(damaged):
    mp = damaged / "manifest.json"
    d = json.loads(mp.read_text())
    d["schema_version"] = 1
    mp.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="schema version 1.*re-export.*restok export"):
        Manifest.read(damaged)


def test_a_flipped_byte_is_caught_even_with_its_mtime_kept(copy, tmp_path, monkeypatch):
    monkeypatch.setenv("RESTOK_CACHE", str(tmp_path / "cache"))
    Manifest.read(copy)  # verified once: remembered for this user
    w = copy / "generator" / "weights.bin"
    st = w.stat()
    b = bytearray(w.read_bytes())
    b[len(b) // 2] ^= 0x01
    w.write_bytes(bytes(b))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before
    with pytest.raises(ArtifactError, match=r"weights\.bin does not match the sha256"):
        Manifest.read(copy)
    # nothing travels with the folder: a verified export copied elsewhere is verified again there
    assert not any(p.name.startswith(".restok") for p in copy.iterdir())


def test_an_edited_manifest_is_refused(copy):
    """manifest.json is what every other file is checked against: a value changed by hand (still valid JSON,
    every file still matching) is refused, not run with a wrong configuration."""
    mp = copy / "manifest.json"
    d = json.loads(mp.read_text())
    d["generator"]["num_classes"] = 11
    mp.write_text(json.dumps(d, indent=2))
    with pytest.raises(ArtifactError, match="modified after the export wrote it"):
        Manifest.read(copy)
