"""What the GPU backends share (restok.runtime.gpu), on a CPU: buckets, the aligned host-input block, the
rows of the real images, and the graph cache's fallback when a capture fails."""

import numpy as np
import pytest

from restok.manifest import Manifest
from restok.runtime.gpu import HOST_ALIGN, GraphCache, HostBlock, bucket_for, buckets, real_rows
from restok.runtime.plan import HOST_INPUT, BindingPlan


def test_buckets():
    assert buckets(16) == [1, 2, 4, 8, 16] and buckets(12) == [1, 2, 4, 8, 12] and buckets(1) == [1]
    assert [bucket_for(b, 16) for b in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert bucket_for(11, 12) == 12
    with pytest.raises(ValueError, match=r"1\.\.16 images"):
        bucket_for(17, 16)


def test_host_block_offsets_are_256_byte_aligned(tiny_artifacts):
    plan = BindingPlan(Manifest.read(tiny_artifacts))
    block = HostBlock.of(plan)
    inputs = [k for k, b in plan.buffers.items() if b.kind == HOST_INPUT]
    assert sorted(block.offsets) == sorted(inputs)
    spans = sorted((o, o + plan.buffers[k].nbytes) for k, o in block.offsets.items())
    assert all(o % HOST_ALIGN == 0 for o, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])) and spans[-1][1] <= block.nbytes


def test_real_rows():
    assert real_rows(3, 4, guided=True).tolist() == [0, 1, 2, 4, 5, 6]
    assert real_rows(3, 4, guided=False).tolist() == [0, 1, 2]
    assert real_rows(3, 4, guided=True, axis="batch").tolist() == [0, 1, 2]
    x = np.arange(8)  # rows of bucket 4, guided: cond 0..3, uncond 4..7
    assert x[real_rows(2, 4, True)].tolist() == [0, 1, 4, 5]


def test_graph_cache_captures_once_and_falls_back(capsys):
    cache, calls = GraphCache("test"), []

    def capture(ok):
        calls.append(ok)
        if not ok:
            raise RuntimeError("operation not permitted when stream is capturing")
        return f"graph{len(calls)}"

    assert cache.get("a", lambda: capture(True)) == "graph1"
    assert cache.get("a", lambda: capture(True)) == "graph1"  # captured once
    assert cache.get("b", lambda: capture(False)) is None
    assert cache.get("b", lambda: capture(True)) is None  # a failed key stays eager: no second try
    assert calls == [True, False] and "operation not permitted" in cache.failed["b"]
    assert capsys.readouterr().err.count("capture failed for b") == 1
    assert cache.clear() == ["graph1"] and not cache.graphs
