"""Per-method summary over seeds: Markdown, CSV and a rich table."""

from __future__ import annotations

import csv
import io
from statistics import mean
from typing import Sequence

from .methods import METHODS
from .runner import RunResult
from .stats import mean_ci


def summarize(method: str, runs: Sequence[RunResult]) -> dict:
    """One row: final held-out pass@1 mean and 95% t-interval over the seeds that finished."""
    ok = [r for r in runs if r.ok]
    ci = mean_ci([r.final for r in ok])
    befores = [r.before for r in ok if r.before is not None]
    bad = [r for r in runs if not r.ok]
    # failed seeds name their error (the traceback is in the run's error.txt)
    notes = [f"seed {r.seed} {r.status}" + (f": {r.error}" if r.error else "") for r in bad]
    status = "ok" if not bad else "; ".join(notes)

    def avg(xs):
        return mean(xs) if xs else None

    return {
        "method": method,
        "label": METHODS[method][0] if method in METHODS else method,
        "seeds": len(runs),
        "seeds_ok": len(ok),
        "pass@1_before": avg(befores),
        "pass@1_final": ci.mean,
        "pass@1_std": ci.std,
        "ci95_half_width": ci.half_width,
        "ci95_low": ci.low,
        "ci95_high": ci.high,
        "ci95_text": ci.text(),
        "generated_tokens": avg([r.generated_tokens for r in ok]),
        "steps": avg([r.steps for r in ok]),
        "train_wall_s": avg([r.elapsed_s for r in ok]),
        "eval_wall_s": avg([r.eval_s for r in ok]),
        "status": status,
    }


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


COLUMNS = (
    # (header, key, format)
    ("method", "label", ""),
    ("seeds ok", None, ""),
    ("pass@1 before", "pass@1_before", ".3f"),
    ("final pass@1 ± 95% CI", "ci95_text", ""),
    ("gen. tokens", "generated_tokens", ",.0f"),
    ("steps", "steps", ".1f"),
    ("train s", "train_wall_s", ".1f"),
    ("status", "status", ""),
)


def _cells(row: dict) -> list[str]:
    out = []
    for _, key, fmt in COLUMNS:
        if key is None:
            out.append(f"{row['seeds_ok']}/{row['seeds']}")
        elif fmt:
            out.append(_f(row[key], fmt))
        else:
            out.append(str(row[key]))
    return out


def markdown(rows: Sequence[dict]) -> str:
    head = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |")
    return "\n".join(lines) + "\n"


CSV_KEYS = (
    "method", "label", "seeds", "seeds_ok", "pass@1_before", "pass@1_final", "pass@1_std", "ci95_half_width",
    "ci95_low", "ci95_high", "generated_tokens", "steps", "train_wall_s", "eval_wall_s", "status",
)


def to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_KEYS})
    return buf.getvalue()


def rich_table(rows: Sequence[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for head, key, fmt in COLUMNS:
        t.add_column(head, justify="right" if fmt or key is None else "left", overflow="fold")
    for r in rows:
        t.add_row(*_cells(r), style=None if r["seeds_ok"] == r["seeds"] else "red")
    return t
