"""The HTML page shell shared by ``report.html`` and ``trees.html``: one self-contained file
(inline CSS, no scripts, no fonts or images fetched), so it opens offline from ``file://``."""

from __future__ import annotations

from .svg import esc

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 24px 40px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 18px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.sub { color: #666; margin: 0 0 10px; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre, code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 8px; overflow: auto; max-height: 520px; }
td.text { white-space: pre-wrap; font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px;
  max-width: 640px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(530px, 1fr)); gap: 12px; }
.charts figure { margin: 0; border: 1px solid #eee; padding: 4px; }
.charts figcaption { font-size: 12px; color: #555; padding: 2px 6px 4px; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
svg .ct { font-size: 14px; font-weight: 600; fill: #222; }
svg .tick { font-size: 11px; fill: #444; }
svg .axis { font-size: 12px; fill: #222; }
svg .legend { font-size: 11px; fill: #222; }
svg .cnote { font-size: 13px; fill: #888; }
.scroll { overflow: auto; max-height: 86vh; border: 1px solid #ddd; background: #fcfcfc; }
.tree-svg text { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.tree-svg .seg { font-size: 11px; fill: #111; }
.tree-svg .meta { font-size: 9.5px; fill: #333; }
.tree-svg .hi { fill: #b8390e; font-weight: 700; }
.tree-svg .cut { font-size: 10px; fill: #c00; font-weight: 700; }
.tree-svg .edge { fill: none; stroke: #9a9a9a; stroke-width: 1.1; }
.tree-svg .edge.mc { stroke: #c9c9c9; stroke-dasharray: 2 2; }
.legendrow { display: flex; flex-wrap: wrap; gap: 18px; align-items: center; font-size: 12.5px; color: #333; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; border: 1px solid #888; margin-right: 4px; }
a { color: #0b5cad; }
"""


def page(title: str, body: str) -> str:
    """A complete HTML document around ``body`` (already HTML)."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # no favicon request: a file:// page that asks for one logs a console error in Chromium
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
