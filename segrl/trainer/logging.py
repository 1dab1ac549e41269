"""Metrics out: the console, ``metrics.jsonl`` and TensorBoard, under TRL's metric names.

Console output is for a terminal or for a log file: when stdout is not a terminal (nohup,
SLURM, CI, a pipe) lines are never wrapped, there are no colour codes and no progress bars
(:func:`make_console`, :func:`plain_output`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

#: metrics shown on the console line, in this order (everything goes to the files)
CONSOLE_KEYS = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "kl",
    "entropy",
    "completions/mean_length",
    "clip_ratio/region_mean",
    "step_time",
)


#: console width when writing to a file: wide enough that tables keep their natural width
PLAIN_WIDTH = 200


def is_terminal(stream=None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def make_console(**kw) -> Console:
    """A rich console for segrl's output: rich as usual on a terminal; written to a file or a
    pipe, plain text (no colour codes) whose lines are never wrapped (``soft_wrap``)."""
    if is_terminal():
        return Console(**kw)
    return Console(**{"width": PLAIN_WIDTH, "soft_wrap": True, "color_system": None, "highlight": False, **kw})


def plain_output() -> None:
    """Turn off every progress bar (segrl's own follow the console; these are transformers',
    huggingface_hub's, datasets' and any other tqdm bar) when stdout or stderr is not a
    terminal, before those libraries are imported (they read the variables on import)."""
    if is_terminal(sys.stdout) and is_terminal(sys.stderr):
        return
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(var, "1")
    if "transformers" in sys.modules:  # imported already: switch its bars off directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class MetricsLogger:
    """Writes every step's metrics to ``metrics.jsonl`` (and TensorBoard if asked)."""

    def __init__(self, run_dir: Path, report_to=("tensorboard",), console: Console | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.console = console or make_console()
        self.tb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], echo: bool = False) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
            f.write(json.dumps({"step": step, **row}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if echo:
            parts = [f"{k}={clean[k]:.4g}" for k in CONSOLE_KEYS if isinstance(clean.get(k), float)]
            self.console.print(f"[bold]step {step}[/bold] " + " ".join(parts))

    def table(self, title: str, rows: dict[str, dict[str, float]]) -> None:
        """Print a small table: ``rows`` maps a row label to its metric values."""
        cols = sorted({k for r in rows.values() for k in r})
        t = Table(title=title)
        t.add_column("")
        for c in cols:
            t.add_column(c)
        for label, r in rows.items():
            t.add_row(label, *[f"{r[c]:.3f}" if c in r else "" for c in cols])
        self.console.print(t)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
