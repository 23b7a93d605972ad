"""The GPU check's measurements (``restok.measure.gpu``) run here on the CPU: their logic, not their numbers."""

import numpy as np

from restok.export.exporter import ExportOptions, describe_export
from restok.manifest import Manifest
from restok.measure.gpu import (alternating_batches, batch_invariance, precision_gate, preset_models, preset_pipeline,
                                _timed)
from restok.runtime.pipeline import Pipeline


def test_describe_export_is_what_the_export_records(tiny_artifacts):
    """The in-memory manifest the GPU check runs the L preset from equals what an export writes."""
    written = Manifest.read(tiny_artifacts)
    tok, gen, source = preset_models("tiny", seed=written.source["tokenizer_seed"])
    described = describe_export(tok, gen, ExportOptions(max_batch=written.max_batch), source)
    for field in ("precision", "max_batch", "guided", "opset", "kv_cache", "schedule", "tokenizer", "generator"):
        assert getattr(described, field) == getattr(written, field), field
    assert described.graphs.keys() == written.graphs.keys()
    for name, spec in written.graphs.items():
        assert (described.graphs[name].inputs, described.graphs[name].outputs) == (spec.inputs, spec.outputs), name


def test_measurements_run_on_the_cpu(tiny_artifacts):
    with Pipeline(tiny_artifacts, "cuda", device="cpu") as p:
        alt = alternating_batches(p, p, (1, 4, 3))  # no graphs on a CPU: the pipeline is its own eager twin
        assert alt["sizes"] == [1, 4, 3] and alt["all_equal"], alt
        t = _timed(p, 2, runs=2)
        assert t["images_per_second"] > 0 and t["host_share"] == 1.0  # no device to wait for on a CPU
        inv = batch_invariance(p, images=4, batches=(2, 4))
        assert set(inv) == {"images", "identical_in_batches_of_2", "identical_in_batches_of_4"}
    models = preset_models("tiny", seed=Manifest.read(tiny_artifacts).source["tokenizer_seed"])
    with preset_pipeline(models, 4, "cpu", "fp32") as fast, Pipeline(tiny_artifacts) as ref:
        gate = precision_gate(fast, ref, images=4)  # the same fp32 model: the gate sees no difference
        assert gate["token_agreement"] == 1.0 and gate["decoder_psnr_db"] > 60, gate
        g = fast.generate([1, 2], seed=4)
        assert np.array_equal(g.tokens, ref.generate([1, 2], seed=4).tokens)
