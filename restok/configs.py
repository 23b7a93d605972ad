"""One way to build a config dataclass from a dict: unknown keys are an error that lists the known ones."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], d: dict[str, Any], what: str = "config") -> T:
    """``cls(**d)``, refusing keys the dataclass does not have (a typo must not fall back to a default)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**d)
