"""Reading a run directory: ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and one
streaming pass over ``rollouts.jsonl`` (it can be large: every tree of every step)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..tree import RolloutTree

#: algorithms whose probability mask is on when ``train.use_prob_mask`` is unset
PROB_MASK_BY_DEFAULT = ("spo_chain", "spo_tree")


@dataclass
class Run:
    """What the report needs from a run directory (missing files give empty values)."""

    run_dir: Path
    config: dict[str, Any]
    config_text: str
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    def get(self, dotted: str, default: Any = None) -> Any:
        """A config value by ``section.field``."""
        cur: Any = self.config
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur

    @property
    def algo(self) -> str:
        return str(self.get("train.algo", "?"))

    @property
    def rho(self) -> float:
        """The probability-mask threshold (``train.prob_mask_rho``)."""
        return _number(self.get("train.prob_mask_rho"), 0.9)

    @property
    def prob_mask_on(self) -> bool:
        v = self.get("train.use_prob_mask")
        return self.algo in PROB_MASK_BY_DEFAULT if v is None else bool(v)

    @property
    def cut_rho(self) -> float:
        """SPO-chain's cutpoint threshold (``spo.cutpoint_rho``, default the mask's rho)."""
        return _number(self.get("spo.cutpoint_rho"), self.rho)

    def series(self, key: str) -> list[tuple[float, float | None]]:
        """``(step, value)`` of every metrics line that has ``key`` (None for NaN/inf)."""
        out = []
        for row in self.metrics:
            if key in row and isinstance(row.get("step"), (int, float)):
                v = row[key]
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                out.append((float(row["step"]), float(v) if ok else None))
        return out

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.metrics:
            for k in row:
                seen.setdefault(k, None)
        return list(seen)


def _number(v: Any, default: float) -> float:
    """``v`` as a finite float, else ``default`` (a report never fails on a config value)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v:
        return default
    return float(v)


def _text(path: Path) -> str:
    """A file's text ('' if missing or unreadable; undecodable bytes replaced)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    except OSError:
        return ""


def _json(text: str) -> Any:
    """The JSON value of ``text``, or None (invalid, or nested too deeply to read)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def load_run(run_dir: str | Path) -> Run:
    """What is readable in ``run_dir``: anything malformed is left out, never an error (a
    report of someone else's run must open)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    text = _text(run_dir / "config.yaml")
    try:
        config = yaml.safe_load(text) if text else {}
    except (yaml.YAMLError, RecursionError, ValueError):
        config = {}
    # a run killed mid-write can leave a partial last line; a line that is not an object is skipped
    metrics = [m for m in map(_json, _text(run_dir / "metrics.jsonl").splitlines()) if isinstance(m, dict)]
    summary = _json(_text(run_dir / "summary.json"))
    summary = {k: v for k, v in summary.items() if isinstance(v, dict)} if isinstance(summary, dict) else {}
    return Run(run_dir, config if isinstance(config, dict) else {}, text, metrics, summary)


@dataclass
class RolloutScan:
    """Result of :func:`scan_rollouts`.

    ``tokens[step]`` = ``(tree_tokens, independent_tokens)``: tokens held by the step's trees
    with each shared prefix once (prompt included: what a prefix-sharing sampler prefills +
    decodes) and what sampling every leaf on its own would process (each leaf's prompt +
    completion; MC continuations included).
    """

    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    chosen_step: int | None = None
    chosen: list[RolloutTree] = field(default_factory=list)
    first_step: int | None = None
    first: list[RolloutTree] = field(default_factory=list)
    bad_lines: int = 0


def tree_token_counts(t: RolloutTree) -> tuple[int, int]:
    """``(tokens with prefix sharing, tokens without)`` of one tree (see :class:`RolloutScan`)."""
    shared = sum(len(n.token_ids) for n in t.nodes)
    # path lengths top-down (a split tail can have a larger index than its children)
    plen = {0: len(t.nodes[0].token_ids)}
    indep = 0
    for i in t.subtree(0)[1:]:
        plen[i] = plen[t.nodes[i].parent] + len(t.nodes[i].token_ids)
        if t.nodes[i].is_leaf:
            indep += plen[i]
    return shared, indep


def read_tree(line: str) -> RolloutTree | None:
    """The tree of one ``rollouts.jsonl`` line, or None when the line is not a well-formed tree
    (see :func:`check_tree`); ``row["step"]`` is made an int (0 when missing)."""
    d = _json(line)
    if not isinstance(d, dict):
        return None
    try:
        t = RolloutTree.from_dict(d)
        check_tree(t)
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        return None
    step = t.row.get("step", 0)
    t.row["step"] = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) else 0
    return t


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_tree(t: RolloutTree) -> None:
    """``ValueError`` unless every field the report draws has its type: the group, depths,
    parents and children are ints (children point back to their parent), token ids ints,
    log-probs, rewards and values numbers, finish reasons strings, ``info`` a mapping whose
    ``advantage``, ``spo_bounds`` and ``spo_values`` are numbers."""
    if not _is_int(t.group) or not isinstance(t.row, dict) or t.nodes[0].depth != 0:
        raise ValueError("bad group, row or root")
    n = len(t.nodes)
    for i, node in enumerate(t.nodes):
        ok = (
            _is_int(node.parent)
            and _is_int(node.depth)
            and isinstance(node.token_ids, list)
            and all(_is_int(x) for x in node.token_ids)
            and isinstance(node.logprobs, list)
            and all(_is_real(x) for x in node.logprobs)
            and (node.finish_reason is None or isinstance(node.finish_reason, str))
            and (node.reward is None or _is_real(node.reward))
            and (node.value is None or _is_real(node.value))
            and isinstance(node.children, list)
            and len(set(node.children)) == len(node.children)
            and all(_is_int(c) and 0 < c < n and t.nodes[c].parent == i for c in node.children)
            and isinstance(node.info, dict)
        )
        if not ok or not _info_ok(node.info):
            raise ValueError(f"node {i}: a field of the wrong type")


def _info_ok(info: dict) -> bool:
    adv, bounds, vals = info.get("advantage"), info.get("spo_bounds"), info.get("spo_values")
    return (
        (adv is None or _is_real(adv))
        and (bounds is None or (isinstance(bounds, list) and all(_is_int(b) for b in bounds)))
        and (vals is None or (isinstance(vals, list) and all(v is None or _is_real(v) for v in vals)))
    )


def scan_rollouts(run_dir: str | Path, step: int | None = None, prompts: int = 4, stats: bool = True) -> RolloutScan:
    """One pass over ``rollouts.jsonl``: per-step token counts, the first ``prompts`` trees of
    ``step`` (default: the last step) and of the first step. Unreadable lines are skipped
    and counted (a killed run can leave a partial last line)."""
    out = RolloutScan()
    path = Path(run_dir) / "rollouts.jsonl"
    if not path.exists():
        return out
    cur_step: int | None = None
    cur: list[RolloutTree] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            t = read_tree(line)
            if t is None:
                out.bad_lines += 1
                continue
            s = t.row["step"]
            if not out.steps or out.steps[-1] != s:
                out.steps.append(s)
            if stats:
                a, b = tree_token_counts(t)
                x, y = out.tokens.get(s, (0, 0))
                out.tokens[s] = (x + a, y + b)
            if out.first_step is None:
                out.first_step = s
            if s == out.first_step and len(out.first) < prompts:
                out.first.append(t)
            if step is None:  # keep the newest step's first trees while streaming
                if s != cur_step:
                    cur_step, cur = s, []
                if len(cur) < prompts:
                    cur.append(t)
            elif s == step and len(out.chosen) < prompts:
                out.chosen.append(t)
    if step is None:
        out.chosen_step, out.chosen = cur_step, cur
    else:
        out.chosen_step = step
    return out
