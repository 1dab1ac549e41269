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
        return float(self.get("train.prob_mask_rho", 0.9) or 0.9)

    @property
    def prob_mask_on(self) -> bool:
        v = self.get("train.use_prob_mask")
        return self.algo in PROB_MASK_BY_DEFAULT if v is None else bool(v)

    @property
    def cut_rho(self) -> float:
        """SPO-chain's cutpoint threshold (``spo.cutpoint_rho``, default the mask's rho)."""
        v = self.get("spo.cutpoint_rho")
        return self.rho if v is None else float(v)

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


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    cfg_path = run_dir / "config.yaml"
    text = cfg_path.read_text(encoding="utf-8") if cfg_path.exists() else ""
    try:
        config = yaml.safe_load(text) or {} if text else {}
    except yaml.YAMLError:
        config = {}
    metrics = []
    mp = run_dir / "metrics.jsonl"
    if mp.exists():
        for line in mp.read_text(encoding="utf-8").splitlines():
            try:  # a run killed mid-write can leave a partial last line
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    summary = {}
    sp = run_dir / "summary.json"
    if sp.exists():
        try:
            summary = json.loads(sp.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {}
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
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                t = RolloutTree.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                out.bad_lines += 1
                continue
            s = int(t.row.get("step", 0)) if isinstance(t.row.get("step", 0), (int, float)) else 0
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
