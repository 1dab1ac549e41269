"""Held-out accuracy curves: vs generated tokens and vs training wall-clock (PNG, matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .methods import METHODS
from .runner import RunResult


def seed_band(curves: Sequence[Sequence[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds of piecewise-linear curves ``[(x, y), ...]``.

    Seeds evaluate at slightly different x (a step overshoots a token threshold by a varying
    amount; wall-clock differs), so each curve is interpolated onto the union of all their x;
    past a seed's last point its final value is held."""
    grid = np.unique(np.concatenate([[x for x, _ in c] for c in curves]))
    ys = np.stack([np.interp(grid, [x for x, _ in c], [y for _, y in c]) for c in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def _tokens_fmt(x, _pos):
    return f"{x / 1e6:g}M" if x >= 1e6 else (f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}")


def plot_accuracy(
    runs_by_method: dict[str, Sequence[RunResult]],
    x_key: str,
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    budget: float | None = None,
) -> Path:
    """One line per method (mean over seeds) with a shaded min-max band; ``x_key`` is a
    curve-point key (``tokens`` or ``elapsed_s``); ``budget`` draws a vertical line there."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.get_cmap("tab10").colors
    drawn, y_max = 0, 0.0
    order = list(METHODS)
    for i, (method, runs) in enumerate(runs_by_method.items()):
        curves = [sorted((p[x_key], p["pass@1"]) for p in r.curve) for r in runs if r.ok and r.curve]
        if not curves:
            continue
        # a method keeps its colour whichever subset is compared
        c = colors[(order.index(method) if method in order else len(order) + i) % len(colors)]
        y_max = max([y_max] + [y for cv in curves for _, y in cv])
        grid, m, lo, hi = seed_band(curves)
        label = f"{METHODS[method][0] if method in METHODS else method} (n={len(curves)})"
        style = ("-", "--", "-.")[(order.index(method) if method in order else i) % 3]  # overlapping lines stay visible
        ax.plot(grid, m, color=c, lw=2, ls=style, label=label)
        if len(curves) > 1:
            ax.fill_between(grid, lo, hi, color=c, alpha=0.15, lw=0)
        for cv in curves:  # the evaluations themselves, faint
            ax.plot([x for x, _ in cv], [y for _, y in cv], "o", color=c, ms=3, alpha=0.45)
        drawn += 1
    if budget:
        ax.axvline(budget, color="0.4", ls=":", lw=1, label="token budget")
    if not drawn:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    if x_key == "tokens":
        ax.xaxis.set_major_formatter(FuncFormatter(_tokens_fmt))
    ax.set_xlim(left=0)
    # accuracy: keep zero in view so gaps are not exaggerated, and headroom above the best point
    ax.set_ylim(0, min(1.0, y_max * 1.08 + 0.02) if drawn else 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=8, title="mean over seeds; band: min-max", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
