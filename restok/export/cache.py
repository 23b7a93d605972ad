"""Exports of the model options, made once per user in the restok cache (``restok generate`` and every
command without ``--artifacts`` run on them)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import restok
from restok.export.exporter import ExportOptions, export_artifacts, state_dict_sha256
from restok.fileutil import cache_root, locked
from restok.manifest import ArtifactError, Manifest


def cached_export(tokenizer: torch.nn.Module, generator: torch.nn.Module, options: ExportOptions,
                  source: dict) -> Path:
    """The export of (tokenizer, generator) with ``options`` in the user's cache, made on first use; keyed by
    restok's version, the weights' hashes and the options. Concurrent first uses wait for one export
    instead of each exporting."""
    options.validate()
    key = json.dumps({"v": restok.__version__, "tok": state_dict_sha256(tokenizer), "gen": state_dict_sha256(generator),
                      "opts": asdict(options)}, sort_keys=True)
    folder = cache_root() / "artifacts" / hashlib.sha256(key.encode()).hexdigest()[:20]
    with locked(folder.with_name(folder.name + ".export")):  # not locked(folder): staged() takes that one
        try:
            Manifest.read(folder)
            return folder
        except ArtifactError:
            pass
        print(f"restok: exporting the model into {folder} (once)", file=sys.stderr)
        export_artifacts(tokenizer, generator, folder, options, source=source)
    return folder
