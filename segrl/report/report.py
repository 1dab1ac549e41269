"""``report.html``: one self-contained page per run (``segrl report RUN_DIR``; the trainer
writes it when a run ends).

Sections: held-out accuracy before/after, metric curves (inline SVG), tokens saved by
prefix sharing, one sampled tree (the full viewer is ``trees.html``, written alongside),
sample rollouts, and the run's config.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..tree import RolloutTree
from .page import page
from .rundata import RolloutScan, Run, load_run, scan_rollouts
from .svg import esc, fmt_num, line_chart
from .text import Detok, load_run_tokenizer
from .viewer import atomic_write, legend, reward_range, tree_svg, write_tree_view

#: the run's files the report links to (constant names: nothing from the run goes into a link)
_RUN_FILES = ("config.yaml", "metrics.jsonl", "rollouts.jsonl", "summary.json", "trees.html")
#: eval/* keys that are accuracies (the others, tokens and lengths, are not plotted there)
_ACC = ("pass@", "maj@", "acc")


def _chart_specs(run: Run) -> list[tuple[str, str, list[str], str, tuple[float, float] | None, str]]:
    """``(id, title, metric keys, y-axis label, y range, caption)`` of each curve, in order."""
    keys = run.keys()
    evals = [k for k in keys if k.startswith("eval/") and any(a in k for a in _ACC)]
    clip = [k for k in keys if k.startswith("clip_ratio/")]
    reward = ["reward"] + [k for k in ("dynamic/reward_all",) if k in keys]
    beta = run.get("train.beta", 0)
    return [
        ("reward", "Training reward", reward, "reward (mean over the step's completions)", None,
         "Mean reward of the step's sampled trajectories (MC continuations excluded)."
         + (" dynamic/reward_all: before TreePO's dynamic-sampling filter." if len(reward) > 1 else "")),
        ("heldout", "Held-out accuracy", evals, "accuracy (fraction of problems)", (0.0, 1.0),
         f"On {run.get('eval.num_problems', '?')} held-out problems, {run.get('eval.num_samples', '?')} samples each; "
         "step 0 = before training."),
        ("kl", "KL to the reference model", ["kl"], "KL (nats per token, k3 estimate)", None,
         "Logged only with a reference model (train.beta > 0)." if not beta else f"train.beta = {beta}."),
        ("entropy", "Policy entropy", ["entropy"], "entropy (nats per token)", None, "Mean over the trained tokens."),
        ("length", "Completion length", [k for k in (f"completions/{s}_length" for s in ("mean", "min", "max")) if k in keys],
         "tokens per completion", (0.0, None), f"sampling.max_completion_length = {run.get('sampling.max_completion_length', '?')}."),
        ("clip", "Clip ratio", clip, "fraction of trained tokens", (0.0, None),
         "Tokens whose probability ratio was clipped (low / high side / either: region)."),
        ("time", "Step time", [k for k in ("step_time", "timing/rollout", "timing/train") if k in keys], "seconds per step", (0.0, None),
         "Wall-clock time of each training step (rollout + update)."),
    ]


def token_chart(run: Run, scan: RolloutScan, x_range: tuple[float, float] | None = None) -> tuple[str, str]:
    """The prefix-sharing chart and its caption (from the saved trees; metrics otherwise)."""
    if scan.tokens:
        steps = sorted(scan.tokens)
        shared = [(float(s), float(scan.tokens[s][0])) for s in steps]
        indep = [(float(s), float(scan.tokens[s][1])) for s in steps]
        tot_s, tot_i = sum(v for _, v in shared), sum(v for _, v in indep)
        cap = (
            f"Tokens in each step's saved trees: with prefix sharing every shared prefix (the prompt, common segments) "
            f"is prefilled/decoded once; independent sampling would process every leaf's prompt + completion "
            f"(MC continuations included). Whole run: {tot_s:,.0f} vs {tot_i:,.0f} tokens, "
            f"{100 * (1 - tot_s / max(tot_i, 1)):.1f}% saved."
        )
        series = {"with prefix sharing": shared, "independent sampling": indep}
    else:
        dec, ind = run.series("tree/decoded_tokens"), run.series("tree/independent_equivalent_tokens")
        series = {k: v for k, v in (("decoded (tree/decoded_tokens)", dec), ("independent (tree/independent_equivalent_tokens)", ind)) if v}
        cap = "From metrics.jsonl (no rollouts.jsonl): tokens decoded with prefix sharing vs sampling each leaf independently."
    title = "Tokens saved by prefix sharing"
    svg = line_chart(series, title, "training step", "tokens per step", y_range=(0.0, None), chart_id="tokens", x_range=x_range)
    return svg, cap


def heldout_table(run: Run) -> str:
    before, after = run.summary.get("before"), run.summary.get("after")
    if not (before or after):  # summary.json is written at the end: fall back to the eval lines
        ev = [r for r in run.metrics if any(k.startswith("eval/") for k in r)]
        if not ev:
            return '<p class="note">No held-out evaluation logged.</p>'
        strip = lambda r: {k[5:]: v for k, v in r.items() if k.startswith("eval/")}  # noqa: E731
        before, after = strip(ev[0]), strip(ev[-1]) if len(ev) > 1 else None
    cols = sorted({k for r in (before, after) if r for k in r})
    rows = []
    for label, r in (("before training", before), ("after training", after)):
        if r:
            rows.append(f"<tr><th>{label}</th>" + "".join(f'<td class="num">{esc(_cell(r.get(c)))}</td>' for c in cols) + "</tr>")
    if before and after and all(isinstance(r.get("pass@1"), (int, float)) for r in (before, after)):
        d = 100 * (after["pass@1"] - before["pass@1"])
        extra = f'<p class="note">pass@1 {before["pass@1"]:.3f} → {after["pass@1"]:.3f} ({d:+.1f} points).</p>'
    else:
        extra = ""
    head = "<tr><th></th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    return f'<table id="heldout">{head}{"".join(rows)}</table>{extra}'


def _cell(v: Any) -> str:
    """Table numbers: counts in full (1,835), fractions to 4 digits."""
    if isinstance(v, (int, float)) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return fmt_num(v, 4) if isinstance(v, (int, float)) else ("–" if v is None else str(v))


def settings_table(run: Run) -> str:
    keys = [
        "train.algo", "model.name_or_path", "data.task", "train.max_steps", "train.prompts_per_step",
        "train.num_generations", "train.learning_rate", "train.loss_type", "train.beta", "train.epsilon",
        "sampling.temperature", "sampling.max_completion_length", "train.prob_mask_rho",
    ]
    if run.algo == "spo_chain":
        keys += ["spo.partition", "spo.cutpoint_interval", "spo.num_mc_samples", "spo.max_segments"]
    elif run.algo == "spo_tree":
        keys += ["spo.branch_factors", "spo.segment_length"]
    elif run.algo == "treepo" or run.get("train.rollout") == "treepo":
        keys += ["treepo.segment_length", "treepo.max_depth", "treepo.initial_width", "treepo.divergence", "treepo.advantage_level"]
    rows = "".join(f"<tr><th>{esc(k)}</th><td class=\"mono\">{esc(run.get(k))}</td></tr>" for k in keys if run.get(k, "\0") != "\0")
    return f'<table id="settings">{rows}</table>'


def sample_rollouts(trees: list[RolloutTree], detok: Detok, per_tree: int = 3, max_trees: int = 3) -> list[dict[str, Any]]:
    """A few trajectories per tree: the best, the worst and one in between by reward."""
    out = []
    for t in trees[:max_trees]:
        leaves = sorted(t.leaves(include_mc=False), key=lambda l: -(t[l].reward if t[l].reward is not None else float("-inf")))
        if len(leaves) > per_tree:
            leaves = [leaves[0], leaves[len(leaves) // 2], leaves[-1]][:per_tree]
        prompt = t.row.get("prompt")
        for l in leaves:
            out.append(
                {
                    "step": t.row.get("step"),
                    "group": t.group,
                    "prompt": prompt if isinstance(prompt, str) else detok.text(t.prompt_ids()),
                    "answer": t.row.get("answer"),
                    "completion": detok.text(t.path_token_ids(l, include_prompt=False)),
                    "reward": t[l].reward,
                    "finish": t[l].finish_reason,
                    "tokens": t.completion_len(l),
                }
            )
    return out


def rollouts_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="note">No rollouts saved (log.save_rollouts is off).</p>'
    cols = ("step", "group", "prompt", "answer", "completion", "reward", "finish", "tokens")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in cols) + "</tr>"
    body = "".join(
        f'<tr class="rollout"><td class="num">{esc(r["step"])}</td><td class="num">{esc(r["group"])}</td>'
        f'<td class="text">{esc(r["prompt"])}</td>'
        f'<td class="text">{esc("" if r["answer"] is None else r["answer"])}</td><td class="text">{esc(r["completion"])}</td>'
        f'<td class="num">{esc(fmt_num(r["reward"], 4))}</td><td>{esc(r["finish"] or "")}</td><td class="num">{esc(r["tokens"])}</td></tr>'
        for r in rows
    )
    return f'<table id="rollouts">{head}{body}</table>'


def build_report(run_dir: str | Path, tokenizer: Any | None = None, trees_html: bool = True, prompts: int = 4) -> Path:
    """Write ``RUN_DIR/report.html`` (and ``trees.html`` unless ``trees_html`` is False)."""
    run = load_run(run_dir)
    scan = scan_rollouts(run.run_dir, prompts=prompts)
    if tokenizer is None and (scan.chosen or scan.first):
        tokenizer = load_run_tokenizer(run.run_dir, run.get("model.name_or_path"))
    detok = Detok(tokenizer)
    if trees_html:
        write_tree_view(run, scan, detok, run.run_dir / "trees.html")

    steps = [r["step"] for r in run.metrics if "reward" in r and isinstance(r.get("step"), (int, float))]
    parts = [
        f"<h1>Run report — {esc(run.run_dir.name)}</h1>",
        f'<p class="sub">algorithm <b>{esc(run.algo)}</b> · model {esc(run.get("model.name_or_path", "?"))} · '
        f'task {esc(run.get("data.task", "?"))} · {len(steps)} of {esc(run.get("train.max_steps", "?"))} steps logged · '
        f"written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} · files: "
        + " · ".join(f'<a href="{n}">{n}</a>' for n in _RUN_FILES if (run.run_dir / n).exists())
        + "</p>",
        "<h2>Held-out accuracy</h2>",
        heldout_table(run),
        "<h2>Training curves</h2>",
        '<div class="charts">',
    ]
    all_steps = [float(r["step"]) for r in run.metrics if isinstance(r.get("step"), (int, float))] + [float(x) for x in scan.tokens]
    xr = (0.0, max(all_steps)) if all_steps else None  # every chart spans the same steps
    for cid, title, keys, ylab, yr, cap in _chart_specs(run):
        series = {k: run.series(k) for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            cap = f"Not logged in this run. {cap}"
        chart = line_chart(series, title, "training step", ylab, y_range=yr, chart_id=cid, x_range=xr)
        parts.append(f'<figure id="chart-{cid}">{chart}<figcaption>{esc(cap)}</figcaption></figure>')
    tsvg, tcap = token_chart(run, scan, xr)
    parts.append(f'<figure id="chart-tokens">{tsvg}<figcaption>{esc(tcap)}</figcaption></figure>')
    parts.append("</div>")

    parts.append("<h2>A sampled tree</h2>")
    if scan.chosen:
        t = scan.chosen[0]
        rlo, rhi = reward_range([t])
        parts.append(
            f'<p class="note">The first prompt of step {esc(scan.chosen_step)}. All {len(scan.chosen)} saved prompts of that step: '
            f'<a href="trees.html">trees.html</a> (other steps: <code>segrl view {esc(run.run_dir)} --step N</code>).</p>'
        )
        parts.append(legend(run, rlo, rhi))
        parts.append(f'<div class="scroll" style="max-height:60vh">{tree_svg(t, run.rho, detok, rlo, rhi, "report-tree")}</div>')
    else:
        parts.append('<p class="note">No rollouts saved (log.save_rollouts is off).</p>')

    parts.append("<h2>Sample rollouts</h2>")
    rows = []
    if scan.first and scan.first_step != scan.chosen_step:
        rows += sample_rollouts(scan.first, detok, max_trees=2)
    rows += sample_rollouts(scan.chosen, detok, max_trees=2 if rows else 3)
    parts.append('<p class="note">Per prompt: the best, a middle and the worst trajectory by reward, from the first and the last step.</p>')
    parts.append(rollouts_table(rows))
    if scan.bad_lines:
        parts.append(f'<p class="note">{scan.bad_lines} unreadable line(s) in rollouts.jsonl were skipped.</p>')

    parts.append("<h2>Config</h2>")
    parts.append(settings_table(run))
    config = esc(run.config_text or "(no config.yaml)")
    parts.append(f'<details open><summary>config.yaml</summary><pre id="config">{config}</pre></details>')

    path = run.run_dir / "report.html"
    atomic_write(path, page(f"report — {run.run_dir.name}", "\n".join(parts)))
    return path
