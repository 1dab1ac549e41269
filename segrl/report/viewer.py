"""The tree viewer: sampled rollout trees drawn as static SVG (``segrl view RUN_DIR``).

Each node is a box with its segment text (truncated; the full text and every number are in
the hover ``<title>``) and a line of facts: depth, value ``V`` (``R̄`` = mean reward of the
leaves below, where no value was stored), advantage ``A``, probability-mask coverage ``m``
(share of the segment's tokens whose sampling probability is below ``train.prob_mask_rho``;
those tokens are drawn in orange) and finish reason. Leaves are coloured by reward.
SPO-chain cut points are red bars at the left of the segment they open, with the boundary's
Monte-Carlo value; MC continuations are small dots (coloured by reward) under their
boundary node.

Every node element is ``<g class="node ...">`` (``leaf``, ``root``, ``mc`` added where they
apply) with ``data-node``, ``data-depth``, ``data-reward``, ``data-value``,
``data-advantage``, ``data-finish``, ``data-mask-coverage`` (and ``data-cut`` on SPO-chain
segments that start at a cut point), so tests and scripts can query the drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tree import NodeInfo, RolloutTree
from .layout import Layout, tidy_layout
from .page import page
from .rundata import RolloutScan, Run, load_run, scan_rollouts, tree_token_counts
from .svg import color_bar, esc, fmt_num, reward_color, tint
from .text import Detok, load_run_tokenizer, visible

BOX_W = 250  # node box width (px)
BOX_H = 30  # node box height: a text line and a facts line
COL = BOX_W + 44  # column pitch (box + room for the elbow edges)
SLOT = 38  # row height of a leaf drawn as a box
MC_SLOT = 11  # row height of an SPO-chain MC continuation (a dot)
TEXT_CHARS = 35  # segment characters that fit a box line (11 px monospace)
PAD = 12  # margin around the drawing


@dataclass
class NodeFacts:
    """Everything drawn for one node (also what the hover text lists)."""

    text: str
    pieces: list[tuple[str, bool]]  # (token text, prob < rho)
    n_tokens: int
    coverage: float | None  # fraction of tokens with prob < rho; None for the root
    value: float | None
    value_derived: bool  # True: mean leaf reward below, not a stored estimate
    advantage: float | None
    cut: tuple[int, float | None, float | None] | None  # SPO-chain: (offset, V before, V after)


def mean_leaf_reward(tree: RolloutTree) -> dict[int, float]:
    """Mean reward of the (non-MC) leaves below each node, bottom-up."""
    sums: dict[int, tuple[float, int]] = {}
    for i in tree.subtree(0)[::-1]:
        n = tree[i]
        if n.is_leaf:
            ok = i > 0 and not n.info.get(NodeInfo.MC) and n.reward is not None and math.isfinite(n.reward)
            sums[i] = (float(n.reward), 1) if ok else (0.0, 0)
        else:
            s = [sums[c] for c in n.children if c in sums]
            sums[i] = (sum(a for a, _ in s), sum(b for _, b in s))
    return {i: a / b for i, (a, b) in sums.items() if b}


def chain_cuts(tree: RolloutTree) -> dict[int, tuple[int, float | None, float | None]]:
    """SPO-chain: node -> (boundary offset, V(s_b), value after the segment) for every
    segment that starts at a cut point (from the leaves' ``spo_bounds``/``spo_values``)."""
    out = {}
    for leaf in tree.leaves(include_mc=False):
        info = tree[leaf].info
        bounds = info.get(NodeInfo.SPO_BOUNDS)
        if not bounds:
            continue
        vals = list(info.get(NodeInfo.SPO_VALUES) or [None] * len(bounds))
        after = vals[1:] + [tree[leaf].reward]
        for node, start, _ in tree.segment_spans(leaf):
            if start in bounds:
                j = bounds.index(start)
                out[node] = (int(start), vals[j] if j < len(vals) else None, after[j] if j < len(after) else None)
    return out


def node_facts(tree: RolloutTree, rho: float, detok: Detok) -> list[NodeFacts]:
    derived = mean_leaf_reward(tree)
    cuts = chain_cuts(tree)
    out = []
    for i, n in enumerate(tree.nodes):
        probs = [math.exp(min(lp, 0.0)) for lp in n.logprobs]  # a log-prob is <= 0 (no overflow on a bad file)
        low = [p < rho for p in probs]
        pieces = [(detok.piece(t), lo) for t, lo in zip(n.token_ids, low)] if i else [(detok.piece(t), False) for t in n.token_ids]
        value, der = n.value, False
        if value is None and i in derived:
            value, der = derived[i], True
        adv = n.info.get(NodeInfo.ADVANTAGE)
        out.append(
            NodeFacts(
                text=detok.text(n.token_ids),
                pieces=pieces,
                n_tokens=len(n.token_ids),
                coverage=(sum(low) / len(low)) if (i and low) else None,
                value=value,
                value_derived=der,
                advantage=float(adv) if isinstance(adv, (int, float)) else None,
                cut=cuts.get(i),
            )
        )
    return out


def reward_range(trees: Sequence[RolloutTree]) -> tuple[float, float]:
    """Colour scale of the leaves: [0, 1] when every reward lies in it, else their range."""
    rs = [float(t[l].reward) for t in trees for l in t.leaves() if t[l].reward is not None and math.isfinite(t[l].reward)]
    if not rs:
        return 0.0, 1.0
    lo, hi = min(rs), max(rs)
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def _label(pieces: list[tuple[str, bool]], chars: int) -> str:
    """``<tspan>`` s of the first ``chars`` characters; low-probability tokens highlighted."""
    out, used = [], 0
    for s, low in pieces:
        s = visible(s)
        if not s:
            continue
        if used + len(s) > chars:
            s = s[: max(chars - used, 0)] + "…"
            out.append(f'<tspan class="hi">{esc(s)}</tspan>' if low else esc(s))
            break
        out.append(f'<tspan class="hi">{esc(s)}</tspan>' if low else esc(s))
        used += len(s)
    return "".join(out)


def _hover(i: int, n, f: NodeFacts, rho: float) -> str:
    lines = [f"node {i} · depth {n.depth} · {f.n_tokens} tokens"]
    if n.finish_reason:
        lines.append(f"finish reason: {n.finish_reason}")
    if n.reward is not None:
        lines.append(f"reward: {n.reward:.4g}")
    if f.value is not None:
        lines.append(f"{'mean leaf reward below' if f.value_derived else 'value V'}: {f.value:.4g}")
    if f.advantage is not None:
        lines.append(f"advantage A: {f.advantage:+.4g}")
    if f.coverage is not None:
        k = sum(lo for _, lo in f.pieces)
        lines.append(f"probability mask: {k}/{f.n_tokens} tokens with p < {rho:g} ({100 * f.coverage:.0f}%)")
    if f.cut is not None:
        b, v0, v1 = f.cut
        lines.append(f"SPO-chain cut point at completion offset {b}: V(s_b) = {fmt_num(v0, 4)} → {fmt_num(v1, 4)}")
    info = {k: v for k, v in n.info.items() if k != NodeInfo.ADVANTAGE}
    if info:
        lines.append("info: " + ", ".join(f"{k}={_short(v)}" for k, v in info.items()))
    text = f.text if len(f.text) <= 3000 else f.text[:3000] + " …"
    lines.append("")
    lines.append(("prompt:\n" if i == 0 else "segment text:\n") + text)
    return "\n".join(lines)


def _short(v: Any, depth: int = 0) -> str:
    """A node-info value for the hover text: floats short, long lists cut, deep nesting elided."""
    if isinstance(v, float):
        return fmt_num(v, 4)
    if isinstance(v, (list, dict)) and depth >= 4:
        return "…"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x, depth + 1) for x in v[:12]) + (", …" if len(v) > 12 else "") + "]"
    if isinstance(v, dict):
        items = list(v.items())
        return "{" + ", ".join(f"{k}: {_short(x, depth + 1)}" for k, x in items[:12]) + (", …" if len(items) > 12 else "") + "}"
    s = str(v)
    return s if len(s) <= 200 else s[:200] + "…"


def _facts_line(i: int, n, f: NodeFacts, tree: RolloutTree) -> str:
    parts = [f"d{n.depth}"]
    if n.is_leaf and i > 0:
        parts.append(f"R {fmt_num(n.reward)}")
    elif f.value is not None:
        parts.append(f"{'R̄' if f.value_derived else 'V'} {f.value:.3f}")
    if f.advantage is not None:
        parts.append(f"A {f.advantage:+.3f}")
    if f.coverage is not None:
        parts.append(f"m {100 * f.coverage:.0f}%")
    if i == 0:
        parts.append(f"{len(tree.leaves(include_mc=False))} leaves")
    elif n.finish_reason and n.finish_reason != "segment":
        parts.append(n.finish_reason)
    return " ".join(parts)


def layout_for(tree: RolloutTree) -> Layout:
    """Pixel layout of ``tree`` as drawn by :func:`tree_svg`."""
    children = [n.children for n in tree.nodes]
    depth = [n.depth for n in tree.nodes]
    return tidy_layout(children, depth, slot=lambda i: MC_SLOT if tree[i].info.get(NodeInfo.MC) else SLOT, column=COL, node_width=BOX_W)


def tree_svg(tree: RolloutTree, rho: float, detok: Detok, rlo: float = 0.0, rhi: float = 1.0, tree_id: str = "t") -> str:
    """One tree as an ``<svg class="tree-svg">`` (see the module docstring)."""
    lay = layout_for(tree)
    facts = node_facts(tree, rho, detok)
    W, H = lay.width + 2 * PAD, lay.height + 2 * PAD
    n_leaves = len(tree.leaves())
    out = [
        f'<svg class="tree-svg" id="{esc(tree_id)}" xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" '
        f'viewBox="0 0 {W:.0f} {H:.0f}" data-nodes="{len(tree)}" data-leaves="{n_leaves}" '
        f'data-trajectories="{len(tree.leaves(include_mc=False))}" data-group="{esc(tree.group)}" '
        f'data-step="{esc(tree.row.get("step", ""))}">',
        f'<g transform="translate({PAD},{PAD})">',
        '<g class="edges">',
    ]
    for i, n in enumerate(tree.nodes):
        if i == 0:
            continue
        p = n.parent
        x0, y0 = lay.x[p] + BOX_W, lay.y[p]
        x1, y1 = lay.x[i], lay.y[i]
        xm = x1 - 16
        cls = "edge mc" if n.info.get(NodeInfo.MC) else "edge"
        out.append(f'<path class="{cls}" d="M{x0:.1f},{y0:.1f} H{xm:.1f} V{y1:.1f} H{x1:.1f}"/>')
    out.append("</g>")
    for i, n in enumerate(tree.nodes):
        f = facts[i]
        leaf = n.is_leaf and i > 0
        mc = bool(n.info.get(NodeInfo.MC))
        cls = "node" + (" root" if i == 0 else "") + (" leaf" if leaf else "") + (" mc" if mc else "")
        attrs = (
            f'class="{cls}" data-node="{i}" data-depth="{esc(n.depth)}" data-reward="{"" if n.reward is None else f"{n.reward:.6g}"}" '
            f'data-value="{"" if f.value is None else f"{f.value:.6g}"}" '
            f'data-advantage="{"" if f.advantage is None else f"{f.advantage:.6g}"}" '
            f'data-finish="{esc(n.finish_reason or "")}" data-mask-coverage="{"" if f.coverage is None else f"{f.coverage:.4g}"}"'
        )
        if f.cut is not None:
            attrs += f' data-cut="{esc(f.cut[0])}"'
        x, y = lay.x[i], lay.y[i]
        title = f"<title>{esc(_hover(i, n, f, rho))}</title>"
        if mc:  # a dot: K of these hang off every boundary node
            c = reward_color(n.reward, rlo, rhi)
            dot = f'<circle cx="5" cy="0" r="4" fill="{c}" stroke="#555" stroke-width="0.6"/>'
            out.append(f'<g {attrs} transform="translate({x:.1f},{y:.1f})">{title}{dot}</g>')
            continue
        if leaf:
            c = reward_color(n.reward, rlo, rhi)
            fill, stroke = tint(c, 0.55), c
        elif i == 0:
            fill, stroke, c = "#eef3fb", "#6b8fc7", "#6b8fc7"
        else:
            fill, stroke, c = "#ffffff", "#9a9a9a", None
        body = [f'<rect x="0" y="{-BOX_H / 2}" width="{BOX_W}" height="{BOX_H}" rx="3" fill="{fill}" stroke="{stroke}"/>']
        if c and leaf:  # a solid reward stripe: the colour reads even where the tint is faint
            body.append(f'<rect x="0" y="{-BOX_H / 2}" width="5" height="{BOX_H}" rx="1" fill="{c}"/>')
        if f.cut is not None:
            body.append(f'<rect x="-3" y="{-BOX_H / 2 - 2}" width="4" height="{BOX_H + 4}" fill="#d00"/>')
        body.append(f'<text x="8" y="-3" class="seg" xml:space="preserve" style="white-space:pre">{_label(f.pieces, TEXT_CHARS)}</text>')
        cut = f'<tspan class="cut">✂{esc(f.cut[0])} </tspan>' if f.cut is not None else ""
        body.append(f'<text x="8" y="11" class="meta">{cut}{esc(_facts_line(i, n, f, tree))}</text>')
        out.append(f'<g {attrs} transform="translate({x:.1f},{y:.1f})">{title}{"".join(body)}</g>')
    out.append("</g></svg>")
    return "\n".join(out)


def legend(run: Run, rlo: float, rhi: float) -> str:
    mask = "on" if run.prob_mask_on else "off (shown for information)"
    parts = [
        f"<span>leaf colour = reward {color_bar(rlo, rhi, 'reward')}</span>",
        f'<span><span class="mono" style="color:#b8390e;font-weight:700">abc</span> tokens with sampling probability &lt; ρ = {run.rho:g} '
        f"(probability mask: {esc(mask)}); <b>m</b> = their share of the segment</span>",
        "<span><b>d</b> depth · <b>V</b> value · <b>R̄</b> mean reward of the leaves below (no value stored) · "
        "<b>A</b> advantage (before batch whitening) · <b>R</b> reward</span>",
    ]
    if run.algo == "spo_chain":
        parts.append(
            '<span><span class="swatch" style="background:#d00"></span>'
            f"SPO-chain cut point (a segment opens at a token with p &lt; {run.cut_rho:g}); "
            "the node before it shows the boundary's Monte-Carlo value V; dots = MC continuations</span>"
        )
    parts.append("<span>hover a node for its full text and numbers</span>")
    return '<div class="legendrow">' + "".join(parts) + "</div>"


def tree_block(tree: RolloutTree, run: Run, detok: Detok, rlo: float, rhi: float, tree_id: str) -> str:
    """A tree with its heading: prompt, gold answer, counts, token savings."""
    leaves = tree.leaves(include_mc=False)
    rs = [tree[l].reward for l in leaves if tree[l].reward is not None]
    shared, indep = tree_token_counts(tree)
    prompt = tree.row.get("prompt")
    prompt_text = prompt if isinstance(prompt, str) else detok.text(tree.prompt_ids())
    mc = len(tree.leaves()) - len(leaves)
    facts = [
        f"step {tree.row.get('step', '?')}",
        f"group {tree.group}",
        f"{len(tree)} nodes",
        f"{len(leaves)} trajectories" + (f" + {mc} MC continuations" if mc else ""),
        f"depth {tree.max_depth()}",
        f"mean reward {fmt_num(sum(rs) / len(rs)) if rs else '–'}",
        f"tokens {shared} with prefix sharing vs {indep} independent ({100 * (1 - shared / max(indep, 1)):.0f}% saved)",
    ]
    ans = tree.row.get("answer")
    return (
        f'<section class="tree" id="sec-{esc(tree_id)}"><h3>{esc(" · ".join(facts[:2]))}</h3>'
        f'<p class="note">{esc(" · ".join(facts[2:]))}</p>'
        f"<table><tr><th>prompt</th><td class=\"text\">{esc(prompt_text)}</td></tr>"
        + (f'<tr><th>answer</th><td class="text">{esc(ans)}</td></tr>' if ans is not None else "")
        + "</table>"
        f'<div class="scroll">{tree_svg(tree, run.rho, detok, rlo, rhi, tree_id)}</div></section>'
    )


def build_tree_view(
    run_dir: str | Path,
    step: int | None = None,
    prompts: int = 4,
    tokenizer: Any | None = None,
    out: str | Path | None = None,
    strict: bool = False,
) -> Path:
    """Write ``RUN_DIR/trees.html`` (or ``out``): the first ``prompts`` trees of ``step``
    (default: the last step saved in ``rollouts.jsonl``). Returns the path written.
    ``strict`` (``segrl view``): a step without trees raises StepNotFoundError, naming the
    steps saved, and writes nothing (else the page says so)."""
    run = load_run(run_dir)
    scan = scan_rollouts(run.run_dir, step=step, prompts=max(1, prompts), stats=False)
    if strict and step is not None and not scan.chosen:
        from ..errors import StepNotFoundError

        raise StepNotFoundError(f"{run.run_dir}: no rollout trees saved for step {step}; steps saved: {_step_ranges(scan.steps)}")
    if tokenizer is None:
        tokenizer = load_run_tokenizer(run.run_dir, run.get("model.name_or_path"))
    path = Path(out) if out else run.run_dir / "trees.html"
    write_tree_view(run, scan, Detok(tokenizer), path, requested_step=step)
    return path


def write_tree_view(run: Run, scan: RolloutScan, detok: Detok, path: Path, requested_step: int | None = None) -> None:
    """``trees.html`` from an already made :class:`RolloutScan` (the report reuses its scan)."""
    trees = scan.chosen
    rlo, rhi = reward_range(trees)
    head = (
        f"<h1>Rollout trees — {esc(run.run_dir.name)}</h1>"
        f'<p class="sub">algorithm <b>{esc(run.algo)}</b> · step {esc(scan.chosen_step if scan.chosen_step is not None else "–")} '
        f"· {len(trees)} prompt(s) · steps saved: {esc(_steps_summary(scan.steps))} · "
        f'<a href="report.html">report</a> · rebuild with <code>segrl view RUN_DIR --step N --prompts K</code></p>'
    )
    if not trees:
        if not (run.run_dir / "rollouts.jsonl").exists():
            why = "no rollouts.jsonl in this run (log.save_rollouts is off?)"
        else:
            why = f"no trees saved for step {requested_step}"
        body = head + f'<p class="note">{esc(why)}</p>'
    else:
        toc = " · ".join(f'<a href="#sec-tree{k}">group {esc(t.group)}</a>' for k, t in enumerate(trees))
        body = head + legend(run, rlo, rhi) + f'<p class="note">{toc}</p>' + "".join(
            tree_block(t, run, detok, rlo, rhi, f"tree{k}") for k, t in enumerate(trees)
        )
        if detok.tok is None:
            body += '<p class="note">No tokenizer found: token ids are shown instead of text.</p>'
    atomic_write(path, page(f"trees — {run.run_dir.name}", body))


def _step_ranges(steps: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3, 7, 9-10"`` (``"none"`` when empty)."""
    parts, ordered = [], sorted(set(steps))
    for s in ordered:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in parts) or "none (no rollouts.jsonl, or log.save_rollouts was off)"


def _steps_summary(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else str(steps[0])


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file: a browser never sees half a page."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
