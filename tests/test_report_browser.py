"""The report and the tree viewer in headless Chromium (Debian ``chromium`` +
``chromium-driver``, driven by Selenium; ``.ci/run`` installs them): pages load from
``file://`` without console errors, screenshots are non-trivial, and the DOM holds exactly
the nodes and leaves of the trees drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_helpers import one_torch_thread  # noqa: F401  (autouse: in-process runs use one torch thread)
from report_helpers import (
    chain_tree,
    chromium_driver,
    default_tokenizer,
    full_page_screenshot,
    full_tree,
    have_chromium,
    severe_console_entries,
    write_run,
)

from segrl.report import build_report, build_tree_view

pytestmark = pytest.mark.skipif(
    not have_chromium(),
    reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver) "
    "and selenium (pip install -e '.[test]')",
)


@pytest.fixture(scope="module")
def driver():
    d = chromium_driver()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def blank_png_size(driver, tmp_path_factory) -> int:
    """Size of a screenshot of an empty page of the same window size (the baseline)."""
    p = tmp_path_factory.mktemp("blank") / "blank.html"
    p.write_text("<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body></body></html>")
    driver.set_window_size(1400, 1000)
    driver.get(p.as_uri())
    return len(driver.get_screenshot_as_png())


def _load(driver, path: Path) -> None:
    driver.set_window_size(1400, 1000)
    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(path.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"
    assert severe_console_entries(driver) == []


def _screenshot_ok(driver, path: Path, blank: int) -> None:
    driver.set_window_size(1400, 1000)
    driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # a page with charts/trees compresses far worse than a blank one
    assert len(data) > max(20_000, 3 * blank), (len(data), blank)
    try:
        from PIL import Image
    except ImportError:
        return
    im = Image.open(path).convert("RGB")
    colours = im.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # not one flat colour


def _counts(driver) -> list[dict]:
    """Per drawn tree: its data-* totals and the node/leaf elements actually in the DOM."""
    return driver.execute_script(
        """
        return Array.from(document.querySelectorAll('svg.tree-svg')).map(s => ({
            nodes: s.querySelectorAll('g.node').length,
            leaves: s.querySelectorAll('g.node.leaf').length,
            mc: s.querySelectorAll('g.node.mc').length,
            roots: s.querySelectorAll('g.node.root').length,
            dataNodes: +s.dataset.nodes, dataLeaves: +s.dataset.leaves,
            maxDepth: Math.max(...Array.from(s.querySelectorAll('g.node')).map(g => +g.dataset.depth)),
        }));
        """
    )


@pytest.mark.parametrize("shape", [[2, 2, 2], [4, 4, 4]], ids=["1+2+4+8", "64-leaves"])
def test_tree_view_draws_every_node_and_leaf(driver, tmp_path, shape, blank_png_size):
    trees = [full_tree(shape, group=g, seed=g) for g in range(2)]
    run = write_run(tmp_path / "run", {1: trees})
    page = build_tree_view(run, tokenizer=default_tokenizer())
    _load(driver, page)
    got = _counts(driver)
    assert len(got) == 2
    for t, c in zip(trees, got):
        assert (c["nodes"], c["leaves"], c["roots"], c["mc"]) == (len(t), len(t.leaves()), 1, 0)
        assert (c["dataNodes"], c["dataLeaves"], c["maxDepth"]) == (len(t), len(t.leaves()), len(shape))
    # readable: drawn leaf boxes never overlap, even with 64 leaves
    overlaps = driver.execute_script(
        """
        const svg = document.querySelector('svg.tree-svg');
        const r = Array.from(svg.querySelectorAll('g.node.leaf > rect:first-of-type')).map(e => e.getBoundingClientRect())
            .sort((a, b) => a.top - b.top);
        let n = 0; for (let i = 1; i < r.length; i++) if (r[i].top < r[i - 1].bottom - 0.5) n++;
        return [n, r.length, r.length ? r[0].height : 0];
        """
    )
    assert overlaps[0] == 0 and overlaps[1] == len(trees[0].leaves()) and overlaps[2] > 20
    # hover text: every node has a <title> with its numbers and full text
    assert driver.execute_script(
        "return Array.from(document.querySelectorAll('g.node'))"
        ".every(g => g.querySelector('title') && g.querySelector('title').textContent.includes('depth'))"
    )
    _screenshot_ok(driver, tmp_path / "trees.png", blank_png_size)


def test_spo_chain_view_shows_cuts_and_mc_continuations(driver, tmp_path, blank_png_size):
    t = chain_tree(k_mc=4)
    run = write_run(tmp_path / "run", {2: [t]}, algo="spo_chain")
    _load(driver, build_tree_view(run, tokenizer=default_tokenizer()))
    (c,) = _counts(driver)
    assert (c["nodes"], c["leaves"], c["mc"]) == (len(t), len(t.leaves()), len(t.leaves()) - len(t.leaves(include_mc=False)))
    assert driver.execute_script("return document.querySelectorAll('g.node[data-cut]').length") == 4
    assert "cut point" in driver.page_source
    _screenshot_ok(driver, tmp_path / "chain.png", blank_png_size)


def test_report_loads_with_charts_tree_and_config(driver, tmp_path, blank_png_size):
    trees = {s: [full_tree([2, 2, 2], group=g, seed=s) for g in range(2)] for s in (1, 2, 3)}
    run = write_run(tmp_path / "run", trees)
    page = build_report(run, tokenizer=default_tokenizer())
    _load(driver, page)
    charts = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map(s => [s.dataset.chart, s.querySelectorAll('polyline').length])"
    )
    got = dict(charts)
    for name in ("reward", "heldout", "kl", "entropy", "length", "clip", "tokens"):
        assert got.get(name, 0) >= 1, (name, got)
    (c,) = _counts(driver)  # the embedded tree
    assert (c["nodes"], c["leaves"]) == (15, 8)
    assert "algo: spo_tree" in driver.find_element("id", "config").text
    assert len(driver.find_elements("css selector", "tr.rollout")) >= 3
    _screenshot_ok(driver, tmp_path / "report.png", blank_png_size)
    # the link to the viewer works offline
    driver.find_element("link text", "trees.html").click()
    assert driver.current_url.endswith("trees.html") and len(_counts(driver)) == 2
    assert severe_console_entries(driver) == []


def test_real_training_run_report_in_browser(driver, tmp_path, blank_png_size):
    """A tiny real SPO-chain run: the trainer writes both pages, and they render."""
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    cfg = load_config(
        None,
        {
            "train.algo": "spo_chain",
            "train.max_steps": 2,
            "train.prompts_per_step": 2,
            "train.num_generations": 4,
            "spo.num_mc_samples": 3,
            "sampling.max_completion_length": 40,
            "eval.eval_before": False,  # the after-training evaluation alone keeps it quick
            "eval.num_problems": 2,
            "eval.num_samples": 2,
            "data.num_train": 16,
            "log.report_to": "none",
            "log.progress": False,
        },
    )
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run).train()
    from segrl.tree import load_jsonl

    last = [t for t in load_jsonl(run / "rollouts.jsonl") if t.row["step"] == 2]
    _load(driver, run / "trees.html")
    got = _counts(driver)
    assert [(c["nodes"], c["leaves"]) for c in got] == [(len(t), len(t.leaves())) for t in last]
    _screenshot_ok(driver, tmp_path / "real_trees.png", blank_png_size)
    _load(driver, run / "report.html")
    assert driver.execute_script("return document.querySelectorAll('svg.chart').length") >= 7
    _screenshot_ok(driver, tmp_path / "real_report.png", blank_png_size)
    full_page_screenshot(driver, tmp_path / "full.png")
    assert (tmp_path / "full.png").stat().st_size > 50_000


def test_crafted_run_runs_no_injected_code(driver, tmp_path):
    # every field of the run holds injection strings (see test_report_injection.py)
    from test_report_injection import MARK, EvilTokenizer, make_crafted_run

    run = make_crafted_run(tmp_path)
    build_report(run, tokenizer=EvilTokenizer())
    for page in ("report.html", "trees.html"):
        driver.get((run / page).resolve().as_uri())  # an alert() would raise UnexpectedAlertPresentException
        assert driver.execute_script("return document.readyState") == "complete"
        assert driver.execute_script("return document.documentElement.getAttribute(arguments[0])", MARK) is None
        assert driver.execute_script("return document.querySelectorAll('script, img, iframe, [onerror], [onload]').length") == 0
