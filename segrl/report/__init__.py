"""Run reports and the rollout-tree viewer: self-contained HTML + inline SVG, no server.

* :func:`build_report` writes ``RUN_DIR/report.html`` (``segrl report RUN_DIR``; the trainer
  writes it at the end of every run);
* :func:`build_tree_view` writes ``RUN_DIR/trees.html`` (``segrl view RUN_DIR``).
"""

from .report import build_report
from .viewer import build_tree_view

__all__ = ["build_report", "build_tree_view"]
