"""The one way a benchmark script ends: its result as JSON on stdout (and in --json), exit 1 when a
requirement given with --require was not met."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def report(out: dict, json_path: str | None, met: bool = True) -> None:
    out["requirements_met"] = met
    text = json.dumps(out, indent=1, allow_nan=False)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    sys.exit(0 if met else 1)
