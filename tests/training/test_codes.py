"""Code shards (restok.training.codes): extract-codes round-trips and resumes, and training on an unfinished or
damaged extract-codes folder is refused."""

import json

import numpy as np
import pytest
import torch

from restok.training.codes import extract_codes
from restok.training.data import CodesDataset, DigitsDataset


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


def test_unfinished_codes_are_refused(tmp_path, codes_dir, capsys):
    """Training on a half-written extract-codes folder would silently train on a subset: refused, naming the
    missing shards and the command that finishes it."""
    import shutil

    part = tmp_path / "part"
    shutil.copytree(codes_dir, part)
    meta = json.loads((part / "index.json").read_text())
    meta["shards"] = meta["shards"][:1]
    meta["resume_command"] = "restok extract-codes --tokenizer T --data digits --out part"
    (part / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"codes of 16 of 40 images.*shard_00001\.npz, shard_00002\.npz.*--out part"):
        CodesDataset(part)
    from restok.cli import main

    assert main(["train", "generator", f"codes={part}", f"out={tmp_path / 'g'}", "preset=tiny", "steps=1"]) == 2
    assert "unfinished extract-codes run" in capsys.readouterr().err
    # a truncated shard is a clear error too
    meta["shards"] = json.loads((codes_dir / "index.json").read_text())["shards"]
    (part / "index.json").write_text(json.dumps(meta))
    (part / "shard_00001.npz").write_bytes((part / "shard_00001.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"shard_00001\.npz is damaged"):
        CodesDataset(part)
