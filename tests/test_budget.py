"""The bit budget across layers (`--method gptq --target-bits`): the knapsack choice, and a tiny model quantized
under a budget whose per-linear widths land in the checkpoint as overrides and meet the budget."""
import pytest

from edgequant.budget import GPTQConfig, allocate
from edgequant.errors import EdgequantError


def test_allocate_spends_the_budget_where_it_saves_most():
    errors = {"a": {2: 100.0, 3: 10.0, 4: 1.0}, "b": {2: 5.0, 3: 4.0, 4: 3.9}, "c": {2: 50.0, 3: 20.0, 4: 0.0}}
    sizes = {"a": 10, "b": 10, "c": 10}
    assert allocate(errors, sizes, 2.0) == {"a": 2, "b": 2, "c": 2}
    # a: 2 -> 3 saves 9 per bit, then c: 2 -> 3 (3 per bit), then c: 3 -> 4 (2 per bit) beats a: 3 -> 4 (0.9)
    assert allocate(errors, sizes, 3.0) == {"a": 3, "b": 2, "c": 4}
    assert allocate(errors, sizes, 4.0) == {"a": 4, "b": 4, "c": 4}
    for t in (2.0, 2.5, 3.0, 3.25, 3.7):
        bits = allocate(errors, sizes, t)
        assert sum(sizes[g] * b for g, b in bits.items()) <= t * 30 + 1e-9


def test_allocate_weighs_sizes():
    # a big group costs more bits per step of width: at the same error saved, the small one is upgraded first
    errors = {"big": {2: 10.0, 3: 5.0, 4: 4.0}, "small": {2: 10.0, 3: 5.0, 4: 4.0}}
    assert allocate(errors, {"big": 90, "small": 10}, 2.1) == {"big": 2, "small": 3}


def test_budget_range():
    with pytest.raises(EdgequantError, match="between 2 and 4"):
        GPTQConfig(target_bits=4.5)


def test_gptq_under_a_budget(tmp_path, model_dirs, text_file):
    from edgequant import api
    from edgequant.artifact import open_checkpoint
    out = api.quantize(str(model_dirs["llama"]), tmp_path / "q", method="gptq", bits=3, group_size=32,
                       target_bits=3.25, calib=text_file, nsamples=4, seqlen=64, progress=False)
    ck = open_checkpoint(out)
    bits = {n: ck.scheme_for(n).bits for n in ck.quantized_linears()}
    sizes = {n: k * m for n, (m, k) in ((n, ck.family.linear_shapes(ck.config)[ck.family.relative_name(n)])
                                        for n in bits)}
    mean = sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values())
    assert mean <= 3.25 + 1e-9 and len(set(bits.values())) > 1, bits
    for i in range(2):   # fused members share a width
        pre = f"model.layers.{i}."
        assert len({bits[pre + f"self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert bits[pre + "mlp.gate_proj"] == bits[pre + "mlp.up_proj"]
    assert ck.provenance["calibration"]["bit_budget"]["mean_bits"] == pytest.approx(mean, abs=1e-4)


def test_owq_under_a_width_budget(tmp_path, model_dirs, text_file):
    """OWQ's fp16 columns on top of the width allocation (scored relative to each linear's output energy): mixed
    widths meet --width-budget, every linear keeps its kind's columns, and inspect reports the sum of both shares."""
    from edgequant import api
    from edgequant.artifact import open_checkpoint
    out = api.quantize(str(model_dirs["llama"]), tmp_path / "q", method="owq", bits=3, group_size=32,
                       width_budget=3.25, target_bits=3.1, budget_metric="relative", clip_search=False,
                       calib=text_file, nsamples=4, seqlen=64, progress=False)
    ck = open_checkpoint(out)
    shapes = ck.family.linear_shapes(ck.config)
    bits = {n: ck.scheme_for(n).bits for n in ck.quantized_linears()}
    sizes = {n: m * k for n in bits for m, k in [shapes[ck.family.relative_name(n)]]}
    mean = sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values())
    assert mean <= 3.25 + 1e-9 and len(set(bits.values())) > 1, bits
    prov = ck.provenance
    counts = prov["calibration"]["weak_columns_per_linear"]
    assert all(prov["layers"][n]["weak_columns"] == counts[ck.family.relative_name(n)] for n in bits)
    assert prov["calibration"]["bit_budget"]["mean_bits"] == pytest.approx(mean, abs=1e-4)
    assert prov["calibration"]["bit_budget"]["metric"] == "relative"
    info = api.inspect(out)
    assert info["bits_target"] == pytest.approx(3.35)
    with_columns = {n for n in bits if counts[ck.family.relative_name(n)]}
    assert with_columns and set(info["outlier_columns"]) == with_columns


def test_width_budget_range():
    from edgequant.calibrate.configs import OWQConfig
    with pytest.raises(EdgequantError, match="--width-budget 1.5 must lie between 2 and 4"):
        OWQConfig(width_budget=1.5, target_bits=3.1)


def test_relative_metric_compares_groups_of_different_scale():
    """Two groups alike but for the size of their activations (10x: 100x the output error and energy): the measured
    error gives every upgrade to the loud group, the relative one sees them as equal and splits the budget."""
    from edgequant.budget import scored
    quiet = {2: 4.0, 3: 1.0, 4: 0.25}
    errors = {"early": quiet, "late": {b: 100 * e for b, e in quiet.items()}}
    energy = {"early": 10.0, "late": 1000.0}
    sizes = {"early": 10, "late": 10}
    assert allocate(scored(errors, energy, "output"), sizes, 3.0) == {"early": 2, "late": 4}
    assert allocate(scored(errors, energy, "relative"), sizes, 3.0) == {"early": 3, "late": 3}


def test_budget_metric_needs_a_budget():
    from edgequant.calibrate.configs import OWQConfig
    with pytest.raises(EdgequantError, match="--budget-metric only apply with --target-bits"):
        GPTQConfig(budget_metric="output")
    with pytest.raises(EdgequantError, match="only apply with --width-budget"):
        OWQConfig(target_bits=3.1, budget_metric="output")
    assert GPTQConfig(target_bits=3.25).budget_metric == "relative"   # the default (measured: quality.py rows 103-107)
    assert GPTQConfig(target_bits=3.25, budget_metric="output").budget_metric == "output"
