"""Plotting primitives: inline SVG strings (no JavaScript, no external files).

Everything returns a string that is pasted into an HTML page as is, so a report opens
offline in any browser. Values are escaped here; callers pass plain text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

#: line colours (colour-blind friendly, Okabe-Ito order)
PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")


def esc(s: object) -> str:
    """Text for an SVG/HTML element or attribute."""
    return escape(str(s), quote=True)


def fmt_num(v: float | None, digits: int = 3) -> str:
    """Short human form: 0.688, -0.0156, 12.3k, 1.2M; '–' for missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.{max(digits, 2)}g}M"
    if a >= 1e3:  # never 1.6e+03 on an axis
        return f"{v / 1e3:.{max(digits, 2)}g}k"
    if a != 0 and a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.{digits}g}"


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``: steps of 1, 2, 2.5, 4 or 5 x 10^k
    (whole numbers only if ``integer``, e.g. training steps), choosing the step that overshoots
    the data least and gives close to ``n`` ticks (0..16 -> 0, 4, 8, 12, 16, not 0..20)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:  # a flat series still gets a readable axis around its value
        if lo == 0:
            hi = 1.0  # all zeros (e.g. no clipped token): 0..1, not -1..1
        else:
            pad = abs(lo) * 0.1
            lo, hi = lo - pad, hi + pad
    span = hi - lo
    mag = 10 ** math.floor(math.log10(span / max(n, 1)))
    best = None
    for k in (0.1, 1, 10):
        for m in (1, 2, 2.5, 4, 5):
            step = m * mag * k
            if integer and (step < 1 or step != int(step)):
                continue
            a, b = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
            count = round((b - a) / step) + 1
            if not 3 <= count <= 8:
                continue
            score = (b - a - span) / span + 0.08 * abs(count - n - 0.5)
            if best is None or score < best[0]:
                best = (score, a, step, count)
    if best is None:  # e.g. integer ticks over a range shorter than 2
        step = 1.0 if integer else span / max(n, 1)
        a = math.floor(lo / step) * step
        count = int(math.ceil((hi - a) / step - 1e-9)) + 1
    else:
        _, a, step, count = best
    return [round(a + i * step, 12) for i in range(count)]


def reward_color(r: float | None, lo: float = 0.0, hi: float = 1.0) -> str:
    """Red (``lo``) -> yellow -> green (``hi``); grey when the reward is missing."""
    if r is None or not math.isfinite(r):
        return "#bdbdbd"
    t = 0.5 if hi <= lo else min(max((r - lo) / (hi - lo), 0.0), 1.0)
    stops = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            u = (t - t0) / (t1 - t0)
            return "#{:02x}{:02x}{:02x}".format(*tuple(round(a + (b - a) * u) for a, b in zip(c0, c1)))
    return "#1a9850"


def tint(color: str, amount: float = 0.6) -> str:
    """``color`` mixed with white (``amount`` = share of white): a fill text stays readable on."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "#{:02x}{:02x}{:02x}".format(*tuple(round(c + (255 - c) * amount) for c in (r, g, b)))


def legend_labels(names: Sequence[str]) -> list[str]:
    """Legend texts: a path prefix shared by every series is dropped (``clip_ratio/low_mean``,
    ``clip_ratio/high_mean`` -> ``low_mean``, ``high_mean``); long names are shortened."""
    names = list(names)
    if len(names) > 1 and all("/" in n for n in names):
        heads = {n.rsplit("/", 1)[0] for n in names}
        if len(heads) == 1:
            names = [n.rsplit("/", 1)[1] for n in names]
    return [n if len(n) <= 34 else n[:33] + "…" for n in names]


def _legend_spots(labels: Sequence[str], width: int, ml: int, mr: int, y: float) -> tuple[list[tuple[float, float]], float]:
    """Where each legend entry goes (rows wrap at the chart's width), and the last row's y."""
    spots, lx, ly = [], ml, y
    for label in labels:
        w = 14 + 6.2 * len(label)
        if lx + w > width - mr and lx > ml:
            lx, ly = ml, ly + 14
        spots.append((lx, ly))
        lx += w + 10
    return spots, ly


def _axes(xt, yt, X, Y, box: tuple[int, int, int, int], x_label: str, y_label: str) -> list[str]:
    """Grid lines, the plot frame, tick labels and axis titles."""
    ml, mt, pw, ph = box
    out = ['<g class="grid" stroke="#e5e5e5">']
    out += [f'<line x1="{ml}" x2="{ml + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}"/>' for t in yt]
    out += [f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{mt}" y2="{mt + ph}"/>' for t in xt]
    out.append("</g>")
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out += [f'<text x="{ml - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" class="tick">{esc(fmt_num(t))}</text>' for t in yt]
    out += [f'<text x="{X(t):.1f}" y="{mt + ph + 15}" text-anchor="middle" class="tick">{esc(fmt_num(t))}</text>' for t in xt]
    out.append(f'<text x="{ml + pw / 2}" y="{mt + ph + 32}" text-anchor="middle" class="axis">{esc(x_label)}</text>')
    out.append(f'<text transform="translate(14,{mt + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">{esc(y_label)}</text>')
    return out


def _series(name: str, s: Sequence[tuple[float, float | None]], c: str, X, Y, x_label: str) -> list[str]:
    """One series: its polylines (``None`` values split the line) and point markers."""
    good = [(x, y) for x, y in s if y is not None and math.isfinite(y)]
    segs, cur = [], []
    for x, y in s:
        if y is None or not math.isfinite(y):
            if cur:
                segs.append(cur)
            cur = []
        else:
            cur.append((x, y))
    if cur:
        segs.append(cur)
    out = [f'<g class="series" data-name="{esc(name)}" data-points="{len(good)}">']
    for seg in segs:
        d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in seg)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{d}"/>')
    r = 2.6 if len(good) <= 60 else 1.2  # markers stay visible but do not blot long runs
    for x, y in good:
        out.append(
            f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="{r}" fill="{c}"><title>{esc(name)}, {esc(x_label)} '
            f"{esc(fmt_num(x, 6))}: {esc(fmt_num(y, 4))}</title></circle>"
        )
    out.append("</g>")
    return out


def line_chart(
    series: dict[str, Sequence[tuple[float, float | None]]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 520,
    height: int = 300,
    y_range: tuple[float | None, float | None] | None = None,
    chart_id: str = "",
    integer_x: bool = True,
    x_range: tuple[float, float] | None = None,
) -> str:
    """A line chart of named ``(x, y)`` series with labelled axes, ticks, grid and legend.

    ``None`` values break a line (a metric missing at some steps). Points carry a
    ``<title>`` tooltip. The ``<svg>`` has ``class="chart"``, ``data-chart`` and
    ``data-series`` (the number of series drawn); each series is a ``<g class="series">``
    with ``data-name`` and ``data-points``, so tests can find them.
    """
    ml, mr, mt, mb = 64, 16, 30, 62
    pw, ph = width - ml - mr, height - mt - mb
    # legend rows under the x-axis label, laid out first: the chart grows to fit them
    labels = legend_labels(list(series))
    spots, last_row = _legend_spots(labels, width, ml, mr, mt + ph + 50)
    height = max(height, last_row + 8)
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" style="width:100%;height:auto" '
        f'viewBox="0 0 {width} {height}" data-series="{len(series)}" data-chart="{esc(chart_id or title)}" role="img">',
        f"<title>{esc(title)}</title>",
        f'<text x="{width / 2}" y="18" text-anchor="middle" class="ct">{esc(title)}</text>',
    ]
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="cnote">no data</text></svg>')
        return "".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xl, xh = (min(xs), max(xs)) if x_range is None else (min(x_range[0], min(xs)), max(x_range[1], max(xs)))
    xt = nice_ticks(xl, xh, 6, integer=integer_x)  # x_range: charts of one report share their x-axis
    lo, hi = y_range or (None, None)  # a given bound is kept unless the data lie beyond it
    lo = min(ys) if lo is None else min(lo, min(ys))
    hi = max(ys) if hi is None else max(hi, max(ys))
    yt = nice_ticks(lo, hi, 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def X(x: float) -> float:
        return ml + (x - x0) / ((x1 - x0) or 1) * pw

    def Y(y: float) -> float:
        return mt + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out += _axes(xt, yt, X, Y, (ml, mt, pw, ph), x_label, y_label)
    for i, ((name, s), label, (lx, ly)) in enumerate(zip(series.items(), labels, spots)):
        c = PALETTE[i % len(PALETTE)]
        out += _series(name, s, c, X, Y, x_label)
        out.append(f'<rect x="{lx}" y="{ly - 7}" width="10" height="3" fill="{c}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly - 2}" class="legend">{esc(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def color_bar(lo: float, hi: float, label: str, width: int = 220) -> str:
    """A small horizontal legend of :func:`reward_color` from ``lo`` to ``hi``."""
    n = 24
    cells = "".join(
        f'<rect x="{8 + i * (width - 16) / n:.1f}" y="4" width="{(width - 16) / n + 0.5:.1f}" height="10" '
        f'fill="{reward_color(lo + (hi - lo) * i / (n - 1), lo, hi)}"/>'
        for i in range(n)
    )
    return (
        f'<svg class="colorbar" xmlns="http://www.w3.org/2000/svg" width="{width}" height="34" viewBox="0 0 {width} 34">'
        f"{cells}"
        f'<text x="8" y="27" class="tick">{esc(fmt_num(lo))}</text>'
        f'<text x="{width / 2}" y="27" text-anchor="middle" class="tick">{esc(label)}</text>'
        f'<text x="{width - 8}" y="27" text-anchor="end" class="tick">{esc(fmt_num(hi))}</text></svg>'
    )
