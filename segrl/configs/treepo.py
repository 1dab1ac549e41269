"""TreePO settings (arXiv 2508.17445). Filled in by the TreePO implementation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TreePOConfig:
    """TreePO segment-tree sampling and tree advantages."""
