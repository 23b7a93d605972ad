"""Measurements over exports: parity of a backend against the PyTorch reference (``restok check``) and
latency across backends (``restok bench``). No torch at import: the reference backend loads it when run."""
