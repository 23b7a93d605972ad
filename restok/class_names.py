"""Class names of the served models (no torch): what an OpenAI-style ``prompt`` may say instead of a class id.

ImageNet-1k models (1,000 classes) take ImageNet's WordNet lemmas (``assets/imagenet_classes.tsv``, in
training-label order: "golden retriever" is 207); ten-class models (the bundled digits model, the tiny
preset) take the digits' names "zero".."nine". A prompt is a class id ("207") or one of the class's names,
case-insensitive; a name shared by two classes ("crane": the bird and the machine) asks for the id.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["ClassNames", "PromptError", "class_names_for"]

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class PromptError(ValueError):
    """A prompt that names no class, or more than one: the message says what fits."""


@dataclass(frozen=True)
class ClassNames:
    """Each class's names (the first is the one shown) and the lookup from a lowercase name to class ids."""

    names: tuple[tuple[str, ...], ...]

    def label(self, c: int) -> str:
        return self.names[c][0]

    @property
    def _index(self) -> dict[str, list[int]]:
        return _lookup(self.names)

    def resolve(self, prompt: str) -> int:
        """The class id a prompt names, or PromptError naming close matches."""
        text = " ".join(prompt.split()).lower()
        if not text:
            raise PromptError("the prompt is empty; give a class name or a class id")
        if text.isdigit():
            c = int(text)
            if c < len(self.names):
                return c
            raise PromptError(f"class id {c} is outside [0, {len(self.names)}) for this model")
        ids = self._index.get(text)
        if ids and len(ids) == 1:
            return ids[0]
        if ids:
            which = ", ".join(f"{c} ({', '.join(self.names[c][:2])})" for c in ids)
            raise PromptError(f"{prompt!r} names {len(ids)} classes: {which}; give the class id as the prompt")
        close = difflib.get_close_matches(text, self._index.keys(), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(repr(n) for n in close)}" if close else \
            f"; class ids 0..{len(self.names) - 1} work too"
        raise PromptError(f"{prompt!r} names no class of this model{hint}")


@lru_cache(maxsize=4)
def _lookup(names: tuple[tuple[str, ...], ...]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for c, alts in enumerate(names):
        for n in alts:
            ids = out.setdefault(n.lower(), [])
            if c not in ids:
                ids.append(c)
    return out


@lru_cache(maxsize=1)
def _imagenet() -> ClassNames:
    rows = []
    for line in (Path(__file__).parent / "assets" / "imagenet_classes.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            _, _, lemmas = line.split("\t")
            rows.append(tuple(n.strip() for n in lemmas.split(",") if n.strip()))
    return ClassNames(tuple(rows))


def class_names_for(num_classes: int) -> ClassNames:
    """The names of a model's classes: ImageNet's for 1,000 classes, the digits' for 10; else ids only."""
    if num_classes == 1000:
        return _imagenet()
    if num_classes == 10:
        return ClassNames(tuple((name, str(d)) for d, name in enumerate(DIGITS)))
    return ClassNames(tuple((f"class {c}",) for c in range(num_classes)))
