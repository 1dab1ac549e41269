"""Tidy layout of a rollout tree, left to right: depth -> column, leaves -> rows.

Leaves take consecutive rows in depth-first order (each leaf its own slot, so leaves are
evenly spaced and never overlap); an internal node sits at the middle of its first and
last child. Sub-trees therefore occupy disjoint bands of rows, and edges never cross.
Slots may differ in height (SPO-chain's Monte-Carlo leaves are drawn as small dots).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Layout:
    """Node positions: ``x[i]`` is the left edge of node ``i``'s column, ``y[i]`` its centre."""

    x: list[float]
    y: list[float]
    width: float
    height: float
    leaf_order: list[int]


def tidy_layout(
    children: Sequence[Sequence[int]],
    depth: Sequence[int],
    slot: Callable[[int], float] = lambda i: 1.0,
    column: float = 1.0,
    node_width: float = 0.0,
    root: int = 0,
) -> Layout:
    """Lay out the tree given by ``children`` lists (see module docstring).

    Args:
        children: child indices of every node.
        depth: depth of every node (root 0); column = depth.
        slot: height of the row a leaf takes.
        column: horizontal distance between depths.
        node_width: drawn width of a node (only for the total width).
        root: the root index.
    """
    n = len(children)
    x = [d * column for d in depth]
    y = [0.0] * n
    order: list[int] = []
    cursor = 0.0
    # iterative post-order: a deep SPO chain must not hit the recursion limit
    stack: list[tuple[int, bool]] = [(root, False)]
    while stack:
        i, done = stack.pop()
        kids = children[i]
        if not kids:
            h = slot(i)
            y[i] = cursor + h / 2
            cursor += h
            order.append(i)
        elif done:
            y[i] = (y[kids[0]] + y[kids[-1]]) / 2
        else:
            stack.append((i, True))
            stack.extend((c, False) for c in reversed(kids))
    width = (max(depth) if depth else 0) * column + node_width
    return Layout(x, y, width, cursor, order)
