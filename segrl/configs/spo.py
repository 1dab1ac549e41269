"""SPO settings (arXiv 2505.23564). Filled in by the SPO implementation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SPOConfig:
    """Segment Policy Optimization: partition, MC value estimation, tree shape."""
