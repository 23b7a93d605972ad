"""``restok extract-codes``: tokenize a dataset once for generator training.

Each image is tokenized over several crops ('ten': 4 corners + centre of a 1.1x resize, and their flips;
'center': the centre crop and its flip; flips optional), written in shards of ``shard_size`` images
(``shard_NNNNN.npz``: codes [n, crops, N] and labels [n]) with ``index.json``. Shards are written atomically
and listed in the index only when complete, so an interrupted run resumes at the first missing shard.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from restok.fileutil import atomic_write_bytes


def _clean_stale_tmp(out: Path) -> None:
    """Temporary files of a killed run (``.NAME.XXXX.PID.tmp`` whose PID is gone)."""
    import os

    for p in out.glob(".*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (ValueError, PermissionError, IndexError):
            continue


def extract_codes(tokenizer, data, out: str | Path, crops: str = "ten", flip: bool = True, batch_size: int = 64,
                  shard_size: int = 10000, device: str = "cpu", progress: bool = True, command: str = "") -> Path:
    """Tokenize every image of ``data`` (a dataset with ``pil(i)`` and labels) into ``out``. ``command``, the
    command line that does it, is recorded so that a half-written folder names how to finish it."""
    from tqdm import tqdm

    from restok.training.data import _pil_to_array, crops_for_codes

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch size and shard size must be >= 1, got {batch_size} and {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out)
    idx_path = out / "index.json"
    from restok.export.exporter import state_dict_sha256

    tok_sha = state_dict_sha256(tokenizer)
    meta = {"shards": [], "num_images": len(data), "crops": None, "crop_mode": crops, "flip": flip,
            "num_tokens": tokenizer.cfg.num_latent_tokens, "vocab_size": tokenizer.cfg.codebook_size,
            "num_classes": int(getattr(data, "num_classes", 0)), "tokenizer_sha256": tok_sha, "shard_size": shard_size,
            "resume_command": command}
    if idx_path.is_file():
        try:
            old = json.loads(idx_path.read_text())
        except ValueError as e:
            raise ValueError(f"{idx_path} is damaged ({e}); choose another --out or delete the folder") from e
        same = all(old.get(k) == meta[k] for k in ("crop_mode", "flip", "tokenizer_sha256", "shard_size", "num_images"))
        if not same:
            raise ValueError(f"{out} holds codes from another tokenizer or settings; choose another --out or delete it")
        meta = old
    done = {s["file"] for s in meta["shards"]}
    tokenizer = tokenizer.to(device).eval()
    n_shards = (len(data) + shard_size - 1) // shard_size
    bar = tqdm(total=len(data), desc="extracting codes", unit="img", file=sys.stderr, disable=None if progress else True)
    for si in range(n_shards):
        name = f"shard_{si:05d}.npz"
        lo, hi = si * shard_size, min(len(data), (si + 1) * shard_size)
        if name in done:
            bar.update(hi - lo)
            continue
        codes, labels = [], []
        for b0 in range(lo, hi, batch_size):
            items = list(range(b0, min(hi, b0 + batch_size)))
            views = [crops_for_codes(data.pil(i), tokenizer.cfg.image_size, crops, flip) for i in items]
            k = len(views[0])
            x = torch.from_numpy(np.stack([_pil_to_array(v) for vs in views for v in vs])).to(device)
            with torch.inference_mode():
                ids = tokenizer.encode(x).cpu().numpy().reshape(len(items), k, -1)
            codes.append(ids.astype(np.int16 if tokenizer.cfg.codebook_size <= 32767 else np.int32))
            labels.extend(data.label(i) for i in items)
            bar.update(len(items))
        buf = io.BytesIO()
        np.savez(buf, codes=np.concatenate(codes), labels=np.asarray(labels, dtype=np.int64))
        atomic_write_bytes(out / name, buf.getvalue())
        meta["crops"] = int(codes[0].shape[1])
        meta["shards"].append({"file": name, "count": hi - lo})
        atomic_write_bytes(idx_path, (json.dumps(meta, indent=2) + "\n").encode())
    bar.close()
    return out
