"""Offline jobs over the runtime: ``restok sample`` (resumable, sharded sampling for gFID)."""
