"""bench/defaults: both sides of the reference-defaults comparison come from the same
keywords, longrange's side is the model the speed benchmark's preset measures, and one
alternating comparison runs end to end (no timing is asserted)."""

from __future__ import annotations

import pytest
import torch

from longrange.bench.defaults import CASES, build, compare_in_process, keywords, run_defaults
from longrange.models.registry import get_family
from longrange.testing import import_reference


@pytest.mark.parametrize("family", sorted(CASES))
def test_longrange_side_is_the_bench_preset_model(family):
    ours = build(family, 1024, "longrange").config.to_dict()
    preset = get_family(family).presets["bench"]().replace(max_seq_len=1024).to_dict()
    differ = {k for k in ours if ours[k] != preset[k]}
    # routing's reference class names the head width (64) that the preset leaves implied
    assert differ <= {"dim_head"}
    assert ours.get("dim_head") in (None, ours["dim"] // ours["heads"])


@pytest.mark.parametrize("family", sorted(CASES))
def test_one_comparison_runs_with_the_same_keywords(family):
    import_reference(CASES[family][0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = compare_in_process(family, 256, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert row["keywords"] == keywords(family, 256)
    assert row["keywords"]["causal"] is True
    assert row["longrange_s"] > 0 and row["reference_s"] > 0 and row["speedup"] > 0


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="no reference-defaults comparison"):
        run_defaults(["vanilla"], [256])
