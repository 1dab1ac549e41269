"""The TreePO benchmark's statistics on a tiny run of the embedded model (timings are not
asserted: only that the figures it prints follow from the runs it made)."""

from __future__ import annotations

import statistics

import pytest

from segrl.programs import bench_treepo


def test_bench_figures_follow_from_the_runs():
    if bench_treepo._available("default"):
        pytest.skip("embedded default model not built yet")
    res = bench_treepo.bench_model(
        "default", prompts=3, width=4, max_len=16, segment_length=4, max_depth=4, repeats=3, samplers=("independent", "treepo")
    )
    ind, tr = res["independent"], res["treepo"]
    assert ind["leaves"] == tr["leaves"] == 12  # 3 prompts x 4 leaves, both samplers
    assert ind["decoded"] == ind["traj_tokens"]  # independent sampling shares nothing
    assert tr["decoded"] < tr["traj_tokens"]  # the tree decodes its shared prefixes once
    tok = tr["decoded"] / ind["decoded"]
    med = statistics.median(tr["walls"]) / statistics.median(ind["walls"])
    assert res["saving_efficiency"] == pytest.approx((1 - med) / (1 - tok))
    best = min(tr["walls"]) / min(ind["walls"])
    assert res["best_efficiency"] == pytest.approx((1 - best) / (1 - tok))
    lo, hi = res["paired_efficiency_range"]
    assert lo <= res["paired_efficiency"] <= hi
    table = bench_treepo.format_table(res)
    assert f"best run of each: {res['best_efficiency']:.2f}" in table
