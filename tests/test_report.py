"""Run report and tree viewer without a browser: layout geometry, SVG content, report
content, the CLI, and the trainer's end-of-run hook (``tests/test_report_browser.py`` loads
the pages in headless Chromium)."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest
from reliability_helpers import one_torch_thread  # noqa: F401  (autouse: in-process runs use one torch thread)
from report_helpers import chain_tree, default_tokenizer, full_tree, write_run

from segrl.report import build_report, build_tree_view
from segrl.report.layout import tidy_layout
from segrl.report.rundata import scan_rollouts, tree_token_counts
from segrl.report.svg import line_chart, nice_ticks
from segrl.report.text import Detok
from segrl.report.viewer import BOX_H, COL, MC_SLOT, SLOT, layout_for, node_facts, tree_svg

SVG = "{http://www.w3.org/2000/svg}"


def _nodes(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)  # also checks the SVG is well-formed XML
    return [g for g in root.iter(f"{SVG}g") if "node" in g.get("class", "").split()]


# ----- layout --------------------------------------------------------------------------------


def test_layout_of_a_full_binary_tree_1_2_4_8():
    t = full_tree([2, 2, 2])
    assert (len(t), len(t.leaves())) == (15, 8)
    lay = layout_for(t)
    leaves = t.leaves()
    assert lay.leaf_order == leaves
    ys = [lay.y[l] for l in leaves]
    assert [b - a for a, b in zip(ys, ys[1:])] == [SLOT] * 7  # evenly spaced, in order
    assert lay.height == 8 * SLOT
    for i, n in enumerate(t.nodes):
        assert lay.x[i] == n.depth * COL
        if n.children:  # centred over its first and last child
            assert lay.y[i] == pytest.approx((lay.y[n.children[0]] + lay.y[n.children[-1]]) / 2)
    assert lay.y[0] == pytest.approx(4 * SLOT)


def test_layout_of_64_leaves_keeps_subtrees_in_disjoint_bands():
    t = full_tree([4, 4, 4])
    lay = layout_for(t)
    assert len(t.leaves()) == 64 and len(lay.leaf_order) == 64
    ys = sorted(lay.y[l] for l in t.leaves())
    assert min(b - a for a, b in zip(ys, ys[1:])) >= BOX_H  # boxes never overlap
    for i in range(len(t)):  # every node lies within the band of its own leaves
        band = [lay.y[l] for l in t.subtree_leaves(i)]
        assert min(band) <= lay.y[i] <= max(band)


def test_layout_handles_mc_slots_split_tails_and_deep_chains():
    t = chain_tree(k_mc=3)
    lay = layout_for(t)
    mc = [l for l in t.leaves() if t[l].info.get("mc")]
    assert len(mc) == 9 and lay.height == pytest.approx(len(mc) * MC_SLOT + (len(t.leaves()) - len(mc)) * SLOT)
    # a split tail has a larger index than the head's later children: positions still nest
    for i, n in enumerate(t.nodes):
        if n.children:
            assert lay.y[i] == pytest.approx((lay.y[n.children[0]] + lay.y[n.children[-1]]) / 2)
    # a 3000-deep chain (no recursion limit)
    n = 3000
    lay = tidy_layout([[i + 1] for i in range(n - 1)] + [[]], list(range(n)), column=2.0)
    assert lay.x[-1] == 2.0 * (n - 1) and lay.y[0] == lay.y[-1] == 0.5


# ----- tree SVG --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[2, 2, 2], [4, 4, 4], [8, 8]])
def test_tree_svg_draws_every_node_and_leaf(shape):
    t = full_tree(shape)
    svg = tree_svg(t, 0.9, Detok(default_tokenizer()))
    nodes = _nodes(svg)
    assert len(nodes) == len(t)
    leaves = [g for g in nodes if "leaf" in g.get("class").split()]
    assert len(leaves) == len(t.leaves()) == math.prod(shape)
    assert sorted(int(g.get("data-depth")) for g in nodes) == sorted(n.depth for n in t.nodes)
    for g in leaves:  # leaves carry their reward and stored advantage
        n = t[int(g.get("data-node"))]
        assert float(g.get("data-reward")) == n.reward
        assert float(g.get("data-advantage")) == pytest.approx(n.info["advantage"])
        assert g.find(f"{SVG}title") is not None
    root = ET.fromstring(svg)
    assert root.get("data-nodes") == str(len(t)) and root.get("data-leaves") == str(len(t.leaves()))
    # leaf colour encodes reward: reward 0 and reward 1 leaves are filled differently
    fills = {g.get("data-reward"): g.find(f"{SVG}rect").get("fill") for g in leaves}
    assert fills["0"] != fills["1"]


def test_probability_mask_coverage_and_highlighted_tokens():
    t = full_tree([2])
    leaf = t.leaves()[0]
    t[leaf].logprobs = [math.log(p) for p in (0.3, 0.95, 0.5, 0.99)]  # 2 of 4 below rho = 0.9
    f = node_facts(t, 0.9, Detok(default_tokenizer()))[leaf]
    assert f.coverage == pytest.approx(0.5)
    assert [low for _, low in f.pieces] == [True, False, True, False]
    g = next(g for g in _nodes(tree_svg(t, 0.9, Detok(None))) if g.get("data-node") == str(leaf))
    assert float(g.get("data-mask-coverage")) == pytest.approx(0.5)
    assert "m 50%" in ET.tostring(g, encoding="unicode")
    assert node_facts(t, 0.4, Detok(None))[leaf].coverage == pytest.approx(0.25)


def test_spo_chain_cut_points_values_and_mc_dots():
    t = chain_tree(k_mc=3)
    nodes = _nodes(tree_svg(t, 0.9, Detok(default_tokenizer())))
    assert len(nodes) == len(t)
    mc = [g for g in nodes if "mc" in g.get("class").split()]
    assert len(mc) == 9 and all("leaf" in g.get("class").split() for g in mc)
    cuts = {int(g.get("data-node")): int(g.get("data-cut")) for g in nodes if g.get("data-cut")}
    # both trajectories are cut at offsets 0 and 3: the head segment opens at 0, the tail at 3
    assert sorted(cuts.values()) == [0, 0, 3, 3]
    for i in cuts:
        assert t.segment_spans(t.subtree_leaves(i, include_mc=False)[0])  # a chain segment
    heads = [i for i, b in cuts.items() if b == 0]
    for h in heads:  # the head's end state is a boundary: its MC value is drawn
        g = next(g for g in nodes if g.get("data-node") == str(h))
        assert float(g.get("data-value")) == pytest.approx(t[h].value)


def test_mean_leaf_reward_stands_in_for_a_missing_value():
    t = full_tree([2, 2])
    for n in t.nodes:
        n.value = None
    f = node_facts(t, 0.9, Detok(None))
    assert f[0].value == pytest.approx(0.5) and f[0].value_derived


# ----- report content -------------------------------------------------------------------------


def test_report_has_curves_config_rollouts_and_token_savings(tmp_path):
    trees = {
        1: [full_tree([2, 2, 2], group=g) for g in range(3)],
        2: [full_tree([4, 4, 4], group=g) for g in range(2)],
        3: [full_tree([2, 2], group=0)],
    }
    run = write_run(tmp_path / "run", trees)
    path = build_report(run, tokenizer=default_tokenizer())
    html = path.read_text()
    charts = {m.group(1): m.group(0) for m in re.finditer(r'<svg class="chart"[^>]*data-chart="([^"]+)"[^>]*>', html)}
    assert {"reward", "heldout", "kl", "entropy", "length", "clip", "tokens"} <= set(charts)
    # every training curve has one point per logged step; held-out has steps 0 and 2
    for name, n_points in [("reward", 3), ("kl", 3), ("entropy", 3), ("clip_ratio/high_mean", 3), ("eval/pass@1", 2)]:
        assert re.search(rf'data-name="{re.escape(name)}" data-points="{n_points}"', html), name
    # axes carry units
    for label in ("training step", "nats per token", "fraction of problems", "tokens per step", "tokens per completion"):
        assert label in html
    # token savings from the saved trees: step 2 holds two 64-leaf trees
    shared = sum(tree_token_counts(t)[0] for t in trees[2])
    indep = sum(tree_token_counts(t)[1] for t in trees[2])
    assert indep > 2 * shared
    assert f"{sum(tree_token_counts(t)[0] for s in trees for t in trees[s]):,}" in html
    # config: the full YAML and a settings table
    assert "algo: spo_tree" in html and "prob_mask_rho: 0.9" in html and 'id="settings"' in html
    # held-out before/after, sample rollouts with prompt and completion text
    assert 'id="heldout"' in html and "0.25 → 0.500" not in html and "pass@1 0.250 → 0.500" in html
    assert html.count('<tr class="rollout">') >= 3 and "Q: 1+2 =" in html
    # one tree embedded, trees.html written and linked
    assert html.count('class="tree-svg"') == 1 and 'href="trees.html"' in html
    assert (run / "trees.html").exists()
    # self-contained: no scripts, no external resources
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)


def test_report_survives_missing_files_and_partial_lines(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    html = build_report(run).read_text()
    assert "no data" in html and "No rollouts saved" in html and "No held-out evaluation" in html
    run2 = write_run(tmp_path / "run2", {1: [full_tree([2])]})
    with open(run2 / "rollouts.jsonl", "a") as f:
        f.write('{"group": 0, "nodes": [')  # a run killed mid-write
    (run2 / "summary.json").unlink()
    cfg = run2 / "config.yaml"  # a model that is not here: no tokenizer to decode with
    cfg.write_text(cfg.read_text().replace("name_or_path: default", "name_or_path: /nonexistent-model"))
    html = build_report(run2, tokenizer=None).read_text()
    assert "1 unreadable line" in html and "[20]" in html  # token ids without a tokenizer
    assert 'id="heldout"' in html  # from the eval/* lines instead of summary.json


def test_tree_view_picks_step_and_prompts(tmp_path):
    trees = {1: [full_tree([2], group=g) for g in range(5)], 2: [full_tree([2, 2], group=g) for g in range(5)]}
    run = write_run(tmp_path / "run", trees)
    html = build_tree_view(run, prompts=3, tokenizer=default_tokenizer()).read_text()
    assert html.count('class="tree-svg"') == 3 and 'data-step="2"' in html and 'data-step="1"' not in html
    html = build_tree_view(run, step=1, prompts=10).read_text()
    assert html.count('class="tree-svg"') == 5 and 'data-step="2"' not in html
    assert "no trees saved for step 7" in build_tree_view(run, step=7).read_text()
    scan = scan_rollouts(run, prompts=2)
    assert scan.steps == [1, 2] and scan.chosen_step == 2 and len(scan.chosen) == 2 and scan.first_step == 1


def test_cli_report_and_view(tmp_path, capsys):
    from segrl.cli import main

    run = write_run(tmp_path / "run", {1: [full_tree([2, 2])], 4: [full_tree([2, 2, 2], group=g) for g in range(3)]})
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists() and (run / "trees.html").exists()
    assert main(["view", str(run), "--step", "4", "--prompts", "2"]) == 0
    html = (run / "trees.html").read_text()
    assert html.count('class="tree-svg"') == 2 and 'data-step="4"' in html
    assert "trees.html" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a run directory"):
        main(["view", str(tmp_path / "nope")])


def test_chart_primitives():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 16, 6, integer=True) == [0, 4, 8, 12, 16]  # no overshoot to 20
    assert nice_ticks(1, 3, 6, integer=True) == [1, 2, 3]
    svg = line_chart({"a": [(1, 0.5), (2, None), (3, 0.7)], "b": []}, "T", "training step", "reward")
    root = ET.fromstring(svg)
    assert len(root.findall(f".//{SVG}polyline")) == 2  # the gap splits the line
    assert "training step" in svg and "reward" in svg
    assert "no data" in line_chart({}, "T", "x", "y")


# ----- the trainer's hook ---------------------------------------------------------------------


def test_training_run_writes_report_and_a_report_failure_is_only_a_warning(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import segrl.report
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    cfg = load_config(
        None,
        {
            "train.max_steps": 1,
            "train.prompts_per_step": 2,
            "train.num_generations": 4,
            "sampling.max_completion_length": 40,
            "eval.eval_before": False,
            "eval.eval_after": False,
            "data.num_train": 16,
            "log.report_to": "none",
            "log.progress": False,
        },
    )
    out = io.StringIO()
    tr = Trainer(cfg, run_dir=tmp_path / "run", console=Console(file=out, width=200))
    tr.train()
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'data-chart="reward"' in html and "algo: grpo" in html
    trees = (tmp_path / "run" / "trees.html").read_text()
    assert trees.count('class="tree-svg"') == 2
    # GRPO stores each leaf's advantage with the tree: the viewer shows it
    assert re.search(r'class="node leaf"[^>]*data-advantage="-?\d', trees)

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(segrl.report, "build_report", broken)
    tr._write_report()  # does not raise
    assert "warning: report.html not written: RuntimeError: disk full" in out.getvalue()
