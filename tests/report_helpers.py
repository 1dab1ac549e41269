"""Helpers of the report/viewer tests: hand-made trees and run directories, and a headless
Chromium driven by Selenium that never downloads anything (Debian's chromium and
chromium-driver; ``.ci/run`` installs them)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import yaml

from segrl.tree import FinishReason, RolloutTree, save_jsonl

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def have_chromium() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def chromium_driver(width: int = 1400, height: int = 1000):
    """Headless Chromium with console logging on; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # with the driver path below, selenium-manager never runs
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",  # small /dev/shm in containers
        f"--window-size={width},{height}",
        f"--user-data-dir={tempfile.mkdtemp(prefix='segrl-chromium-')}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def severe_console_entries(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def full_page_screenshot(driver, path: Path, max_height: int = 6000, width: int | None = None) -> Path:
    """Resize the window to the page and save a PNG (headless Chromium draws the window only)."""
    w = width or driver.execute_script("return Math.max(document.documentElement.scrollWidth, 800)")
    h = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(int(w), int(min(h + 200, max_height)))  # + the window chrome headless keeps
    driver.save_screenshot(str(path))
    return path


# --------------------------------------------------------------------------------------------
# hand-made trees with a known shape
# --------------------------------------------------------------------------------------------


def full_tree(branching: list[int], seg_len: int = 4, prompt=(1, 20, 21, 22), seed: int = 0, group: int = 0) -> RolloutTree:
    """A complete tree: ``branching[d]`` children per node at depth ``d`` (1+2+4+8 nodes for
    ``[2, 2, 2]``); rewards alternate 0/1 over the leaves; values and advantages are set as
    SPO-tree would (mean of children, child - parent)."""
    import random

    rng = random.Random(seed)
    t = RolloutTree(list(prompt), group=group, row={"prompt": "Q: 1+2 =\nA:", "answer": "3", "step": 1})
    frontier = [0]
    for d, b in enumerate(branching):
        nxt = []
        last = d == len(branching) - 1
        for p in frontier:
            for _ in range(b):
                toks = [rng.randrange(4, 40) for _ in range(seg_len)]
                lps = [math.log(rng.choice([0.3, 0.95, 0.99, 0.5])) for _ in toks]
                nxt.append(t.add(p, toks, lps, FinishReason.STOP if last else FinishReason.SEGMENT))
        frontier = nxt
    for k, leaf in enumerate(t.leaves()):
        t[leaf].reward = float(k % 2)
    for i in t.subtree(0)[::-1]:
        n = t[i]
        n.value = n.reward if n.is_leaf else sum(t[c].value for c in n.children) / len(n.children)
    for i, n in enumerate(t.nodes):
        n.info["advantage"] = 0.0 if i == 0 else n.value - t[n.parent].value
    return t


def chain_tree(k_mc: int = 3) -> RolloutTree:
    """A small SPO-chain tree: two trajectories cut at offsets [0, 3]; K MC continuations off
    the root and off each head."""
    t = RolloutTree([1, 20, 21], group=0, row={"prompt": "Q: 2+2 =\nA:", "answer": "4", "step": 2})
    lp = [math.log(0.5), math.log(0.99), math.log(0.99), math.log(0.4), math.log(0.99), math.log(0.99)]
    for r in (1.0, 0.0):
        leaf = t.add(0, [30, 31, 32, 33, 34, 2], lp, FinishReason.EOS)
        t[leaf].reward = r
        tail = t.split(leaf, 3)
        t[tail].info.update(spo_bounds=[0, 3], spo_nodes=[0, leaf], spo_values=[0.5, r], spo_candidates=2)
        t[tail].value = r
        t[leaf].value = r
    for head in [0] + [i for i in range(1, len(t)) if t[i].children]:
        for j in range(k_mc):
            c = t.add(head, [35, 2], [math.log(0.7), math.log(0.9)], FinishReason.EOS, mc=True)
            t[c].reward = float(j % 2)
    return t


def write_run(run_dir: Path, trees_by_step: dict[int, list[RolloutTree]], algo: str = "spo_tree", eval_steps=(0, 2)) -> Path:
    """A run directory as the trainer leaves it (config.yaml, metrics.jsonl, rollouts.jsonl,
    summary.json), with made-up metrics of known values."""
    from segrl.configs import load_config, to_dict

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"train.algo": algo, "train.max_steps": max(trees_by_step), "train.beta": 0.01})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    lines = []
    for s in eval_steps[:1]:
        lines.append({"step": s, "eval/pass@1": 0.25, "eval/pass@4": 0.5, "eval/maj@4": 0.3, "eval/tokens": 100.0})
    for s in sorted(trees_by_step):
        lines.append(
            {
                "step": s,
                "reward": 0.1 * s,
                "kl": 0.001 * s,
                "entropy": 0.5 - 0.01 * s,
                "completions/mean_length": 20.0 + s,
                "clip_ratio/low_mean": 0.0,
                "clip_ratio/high_mean": 0.01,
                "clip_ratio/region_mean": 0.01,
                "tree/decoded_tokens": 100.0,
                "tree/independent_equivalent_tokens": 300.0,
                "step_time": 1.0,
            }
        )
        for t in trees_by_step[s]:
            t.row["step"] = s
        save_jsonl(trees_by_step[s], run_dir / "rollouts.jsonl", append=True)
    for s in eval_steps[1:]:
        lines.append({"step": s, "eval/pass@1": 0.5, "eval/pass@4": 0.75, "eval/maj@4": 0.6, "eval/tokens": 100.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"before": {"pass@1": 0.25, "pass@4": 0.5, "maj@4": 0.3}, "after": {"pass@1": 0.5, "pass@4": 0.75, "maj@4": 0.6}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def default_tokenizer():
    """The shipped character tokenizer (token ids of the hand-made trees decode to text)."""
    from transformers import AutoTokenizer

    from segrl.models.default import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)


def screenshot_run(run_dir: Path, out_dir: Path, report_height: int = 1900) -> list[Path]:
    """Rebuild a run's pages and save ``report.png`` (the top of the report) and
    ``trees.png`` (the first tree of ``trees.html``, whole): the docs' images,
    ``python tests/report_helpers.py RUN_DIR docs/img``."""
    from segrl.report import build_report

    build_report(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = chromium_driver()
    out = []
    try:
        for name in ("report", "trees"):
            d.set_window_size(1400, report_height)
            d.get((Path(run_dir) / f"{name}.html").resolve().as_uri())
            bad = severe_console_entries(d)
            if bad:
                raise RuntimeError(f"{name}.html: console errors {bad}")
            if name == "trees":  # the whole first tree: no scroll box, later trees hidden
                d.execute_script(
                    "document.querySelectorAll('.scroll').forEach(e => e.style.maxHeight = 'none');"
                    "document.querySelectorAll('section.tree').forEach((e, i) => { if (i) e.style.display = 'none'; });"
                )
                full_page_screenshot(d, out_dir / "trees.png", max_height=4000, width=1400)
            else:
                d.save_screenshot(str(out_dir / f"{name}.png"))
            out.append(out_dir / f"{name}.png")
    finally:
        d.quit()
    return out


if __name__ == "__main__":
    import sys

    print(screenshot_run(Path(sys.argv[1]), Path(sys.argv[2])))
