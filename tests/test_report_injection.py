"""Opening someone else's run is safe: every string from a run directory reaches report.html and
trees.html as text, never as markup.

A crafted run puts injection strings in every field the pages show (the run's name, config
values and keys, metric names and values, the summary, the rollouts' group, prompt, answer,
step, finish reason, node info, and the decoded completions). The pages are parsed with
``html.parser``: only the tags, attributes and links the report itself writes may appear.
With Chromium present, the pages are also loaded (``--dump-dom``, scripts on) to show that
no payload ran.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from report_helpers import chain_tree, full_tree

from segrl.report import build_report, build_tree_view
from segrl.report.page import CSS
from segrl.tree import save_jsonl

MARK = "data-pwned"  # every payload that runs sets this attribute on <html>
PAYLOADS = [
    f'<script>document.documentElement.setAttribute("{MARK}","script")</script>',
    f"\"><img src=x onerror=\"document.documentElement.setAttribute('{MARK}','img')\">",
    f"'><svg onload=\"document.documentElement.setAttribute('{MARK}','svg')\">",
    f"javascript:document.documentElement.setAttribute('{MARK}','url')",
    f'</style><script>document.documentElement.setAttribute("{MARK}","style")</script>',
    f'</title><script>document.documentElement.setAttribute("{MARK}","title")</script>',
    f"\" onmouseover=\"document.documentElement.setAttribute('{MARK}','attr')\" x=\"",
    "' autofocus onfocus='alert(1)' x='",
    f'--><script>document.documentElement.setAttribute("{MARK}","comment")</script><!--',
    f'<![CDATA[<script>document.documentElement.setAttribute("{MARK}","cdata")</script>]]>',
    '<a href="javascript:alert(1)">click</a><iframe src="javascript:alert(1)"></iframe>',
    f"</textarea></pre></text></svg><body onload=\"document.documentElement.setAttribute('{MARK}','body')\">",
]
#: a run directory name cannot hold "/": the payloads without one
DIR_NAME = "run\"><img src=x onerror=\"document.documentElement.setAttribute('data-pwned','dir')\">"

TAGS = {
    "html", "head", "meta", "link", "title", "style", "body", "h1", "h2", "h3", "p", "b", "a", "code", "table", "tr",
    "th", "td", "details", "summary", "pre", "div", "figure", "figcaption", "section", "span",
    "svg", "g", "path", "rect", "circle", "text", "tspan", "line", "polyline",
}  # fmt: skip
ATTRS = {
    "lang", "charset", "name", "content", "rel", "href", "class", "id", "style", "xmlns", "width", "height", "viewbox",
    "role", "x", "y", "x1", "x2", "y1", "y2", "rx", "r", "cx", "cy", "d", "points", "fill", "stroke", "stroke-width",
    "stroke-dasharray", "transform", "text-anchor", "xml:space", "open",
}  # fmt: skip
LINKS = {"config.yaml", "metrics.jsonl", "rollouts.jsonl", "summary.json", "trees.html", "report.html", "data:,"}


class EvilTokenizer:
    """Every token decodes to a payload: the completions and segment texts are attacks too."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(PAYLOADS[int(i) % len(PAYLOADS)] for i in ids)


def _p(k: int) -> str:
    return PAYLOADS[k % len(PAYLOADS)]


def _trees() -> list:
    trees = [full_tree([2, 2], group=g, seed=g) for g in range(2)] + [chain_tree()]
    for k, t in enumerate(trees):
        t.row.update(prompt=_p(k), answer=_p(k + 1), step=_p(k + 2), **{_p(k + 3): _p(k + 4)})
        for i, n in enumerate(t.nodes):
            n.info[_p(i)] = {_p(i + 1): [_p(i + 2), 1.5]}
            if i and n.is_leaf:
                n.finish_reason = _p(i + 5)
    return trees


def make_crafted_run(root: Path) -> Path:
    run = root / DIR_NAME
    run.mkdir(parents=True)
    config = {
        "model": {"name_or_path": _p(0)},
        "data": {"task": _p(1)},
        "train": {"algo": "spo_chain", "rollout": "treepo", "max_steps": _p(2), "beta": _p(3), "learning_rate": _p(4),
                  "prob_mask_rho": _p(5), "loss_type": _p(6)},
        "eval": {"num_problems": _p(7), "num_samples": _p(8)},
        "sampling": {"max_completion_length": _p(9)},
        "spo": {"partition": _p(10), "cutpoint_rho": _p(11)},
        "treepo": {"segment_length": _p(0), "advantage_level": _p(1)},
        _p(2): {_p(3): _p(4)},
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    lines = [{"step": 0, "eval/pass@1": 0.25, f"eval/{_p(0)}": 0.5}]
    for s in (1, 2):
        lines.append({"step": s, "reward": 0.1 * s, "kl": _p(s), _p(s + 1): 1.0, f"clip_ratio/{_p(s + 2)}": 0.2})
    lines.append({"step": _p(3), "reward": 0.5})
    metrics = "".join(json.dumps(x) + "\n" for x in lines) + "[1, 2]\n" + "[" * 5000 + "\n"
    (run / "metrics.jsonl").write_text(metrics)
    summary = {"before": {"pass@1": _p(4), _p(5): _p(6)}, "after": {"pass@1": 0.5, _p(7): 1.0}, _p(8): _p(9)}
    (run / "summary.json").write_text(json.dumps(summary))
    trees = _trees()
    save_jsonl(trees, run / "rollouts.jsonl")
    with open(run / "rollouts.jsonl", "a") as f:  # groups that are not numbers, and a numeric string
        for k in range(3):
            d = trees[0].to_dict()
            d["group"] = _p(k)
            f.write(json.dumps(d) + "\n")
        d = trees[1].to_dict()
        d["group"] = "7"
        f.write(json.dumps(d) + "\n")
    return run


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self.other: list[str] = []  # comments, declarations other than the doctype, CDATA
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)

    def handle_comment(self, data):
        self.other.append(f"<!--{data}-->")

    def handle_decl(self, decl):
        if decl.lower() != "doctype html":
            self.other.append(decl)

    def unknown_decl(self, data):
        self.other.append(data)

    def handle_pi(self, data):
        self.other.append(data)


def check_page(html: str) -> str:
    """Assert ``html`` holds only markup the report writes; return its text."""
    c = _Collect()
    c.feed(html)
    c.close()
    assert c.other == []
    assert {t for t, _ in c.tags} <= TAGS, {t for t, _ in c.tags} - TAGS
    for tag, attrs in c.tags:
        for name, value in attrs:
            assert name in ATTRS or name.startswith("data-"), (tag, name, value)
            assert not name.startswith("on"), (tag, name)
            if name == "style":  # ours: layout only
                assert not any(bad in (value or "").lower() for bad in ("javascript:", "expression(", "url(")), (tag, value)
            if name == "href":
                assert value in LINKS or value.startswith("#sec-tree"), value
    assert c.styles == [CSS]  # the stylesheet is ours, whole: nothing closed it early
    lowered = html.lower()
    for raw in ("<script", "<img", "<iframe", "<body onload", "<svg onload", "<a href=\"javascript"):
        assert raw not in lowered, raw
    return "".join(c.text)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    run = make_crafted_run(tmp_path_factory.mktemp("crafted"))
    report = build_report(run, tokenizer=EvilTokenizer())
    return run, report.read_text(), (run / "trees.html").read_text()


def test_every_string_in_report_html_is_escaped(pages):
    run, report, _ = pages
    text = check_page(report)
    # the fields did reach the page, as text: the test would see markup if it were not escaped
    assert DIR_NAME in text
    for k in range(len(PAYLOADS)):
        assert _p(k) in text, k
    assert "3 unreadable line(s)" in report  # the three trees whose group is not a number


def test_every_string_in_trees_html_is_escaped(pages):
    run, _, trees = pages
    text = check_page(trees)
    assert DIR_NAME in text and _p(0) in text and "group 7" in text
    for step in (None, 1):  # the viewer's own entry point, and a step with no trees
        check_page(build_tree_view(run, step=step, tokenizer=EvilTokenizer(), out=run / f"view-{step}.html").read_text())


def test_a_string_group_is_refused_when_trees_are_read():
    from segrl.tree import RolloutTree

    d = full_tree([2]).to_dict()
    for bad in (_p(0), "1e3x", None, [1]):
        d["group"] = bad
        with pytest.raises((ValueError, TypeError)):
            RolloutTree.from_dict(d)
    d["group"] = "7"
    assert RolloutTree.from_dict(d).group == 7


def test_report_of_a_crafted_run_never_fails(tmp_path):
    """Fields of the wrong type (no markup involved) are left out, never a traceback."""
    run = tmp_path / "odd"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"train: {prob_mask_rho: abc}\n\xff\xfe")
    (run / "summary.json").write_text(json.dumps({"before": [1], "after": "x"}))
    (run / "metrics.jsonl").write_text('5\n"x"\n{"step": 1, "reward": "high"}\n{"step": 2, "reward": 0.5}\n')
    t = full_tree([2], group=0)
    d = t.to_dict()
    lines = [json.dumps(d)]
    for field, value in (("depth", "x"), ("reward", "high"), ("token_ids", ["a"]), ("logprobs", [1e308]), ("info", [])):
        bad = json.loads(json.dumps(d))
        bad["nodes"][1][field] = value
        lines.append(json.dumps(bad))
    bad = json.loads(json.dumps(d))
    bad["nodes"][1]["info"] = {"spo_bounds": "abc", "advantage": "x"}
    lines.append(json.dumps(bad))
    bad = json.loads(json.dumps(d))
    bad["row"]["step"] = math.inf
    lines.append(json.dumps(bad))
    (run / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    html = build_report(run, tokenizer=None).read_text()
    check_page(html)
    assert "6 unreadable line(s)" in html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="needs a Chromium binary (apt-get install chromium)")
@pytest.mark.parametrize("page", ["report.html", "trees.html"])
def test_no_payload_runs_in_chromium(pages, page):
    run = pages[0]
    with tempfile.TemporaryDirectory(prefix="segrl-chromium-") as profile:
        p = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", f"--user-data-dir={profile}", "--dump-dom", (run / page).resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    dom = p.stdout
    assert "<html" in dom and "</html>" in dom and ("Rollout trees" in dom or "Run report" in dom), (p.returncode, p.stderr[-2000:])
    c = _Collect()
    c.feed(dom)
    assert c.tags[0][0] == "html"
    html_attrs = dict(c.tags[0][1])
    assert MARK not in html_attrs, html_attrs  # a payload that ran would have set it
    assert not [t for t, _ in c.tags if t in ("script", "img", "iframe")]
