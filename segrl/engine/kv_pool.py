"""Rows of KV storage that outlive one decode call (a paged-attention pool, one page per row).

A pool holds, per layer, ``K`` and ``V`` of shape ``[rows, Hkv, positions, D]``. Each row in
use is held through a :class:`Slot` by one owner (a cached node state, a shared block of a
tree, or a running decode call); a ``weakref.finalize`` frees the row when its owner dies
(dropped from ``tree.kv``), so rows are reused across calls without the caller freeing
anything. The pool grows (doubling) when it runs out of rows or positions.

A decode call first :meth:`KVPool.pack` s its rows into one window ``[lo, lo + n)``: it
then attends over ``K[lo:lo + n]`` in place, with no gather and no rows of other owners in the
way. The window is where most of the rows' used positions already lie, and only rows outside
it move (a TreePO round continues most paths in the rows they already occupy, and a group of
rows that starts together usually lies in one stretch), so little is copied between rounds.
"""

from __future__ import annotations

import heapq
import weakref

import torch


def row_index(rows: list[int], device=None) -> torch.Tensor | slice:
    """``rows`` as a slice when they are consecutive, else as an index tensor on ``device``
    (copied without waiting for the device): a slice copy skips the gather/scatter, several
    times cheaper on the CPU."""
    if rows and rows[-1] - rows[0] == len(rows) - 1 and all(b - a == 1 for a, b in zip(rows, rows[1:])):
        return slice(rows[0], rows[-1] + 1)
    t = torch.tensor(rows, dtype=torch.long)
    return t if device is None else t.to(device, non_blocking=True)


def copy_positions(
    dst: torch.Tensor, dst_rows: torch.Tensor | slice, src: torch.Tensor, src_rows: torch.Tensor | slice, n: int, at: int = 0
) -> None:
    """``dst[dst_rows, :, at:at+n] = src[src_rows, :, :n]`` for ``[rows, H, positions, D]``
    stores; rows as index tensors or slices (:func:`row_index`). Indexed rows use
    ``index_select`` + ``index_copy_`` on the position slices (several times faster on CPU than
    advanced-index assignment). The sources are read before any write, so ``src`` may be
    ``dst`` with overlapping rows (then they are always gathered into a copy first)."""
    if isinstance(src_rows, slice) and src is not dst:
        val = src[src_rows, :, :n]
    else:
        if isinstance(src_rows, slice):
            src_rows = torch.arange(src_rows.start, src_rows.stop, device=src.device)
        val = src[:, :, :n].index_select(0, src_rows)
    if isinstance(dst_rows, slice):
        dst[dst_rows, :, at : at + n].copy_(val)
    else:
        dst[:, :, at : at + n].index_copy_(0, dst_rows, val)


class Slot:
    """A handle on one pool row; the row index changes when the pool packs."""

    __slots__ = ("row", "__weakref__")

    def __init__(self, row: int):
        self.row = row


class KVPool:
    """Per-layer ``[rows, Hkv, positions, D]`` K/V storage with a free list.

    V starts zeroed and is only ever written with finite values, so a row's unused
    positions hold finite numbers: masked attention weights (exactly 0) times them are 0.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device):
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.K: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        self.rows = 0
        self.positions = 0
        self.free: list[int] = []  # a heap: the lowest free rows are handed out first
        self.holders: list[Slot | None] = []
        self.lens = torch.zeros(0, dtype=torch.long)  # valid positions per row

    def reserve(self, rows: int, positions: int) -> None:
        """Make room for ``rows`` more rows (beyond the free ones) of ``positions`` positions."""
        need_rows = max(0, rows - len(self.free))
        if need_rows == 0 and positions <= self.positions:
            return
        new_rows = max(self.rows + need_rows, 2 * self.rows) if need_rows else self.rows
        new_pos = self.positions if positions <= self.positions else max(positions, 2 * self.positions)
        L, H, D = self.shape
        for i in range(L):
            for store in (self.K, self.V):
                t = torch.zeros(new_rows, H, new_pos, D, dtype=self.dtype, device=self.device)
                if i < len(store):
                    t[: self.rows, :, : self.positions] = store[i]
                    store[i] = t
                else:
                    store.append(t)
        for r in range(self.rows, new_rows):
            heapq.heappush(self.free, r)
        self.holders.extend([None] * (new_rows - self.rows))
        self.lens = torch.cat([self.lens, torch.zeros(new_rows - self.rows, dtype=torch.long)])
        self.rows, self.positions = new_rows, new_pos

    def alloc(self, n: int) -> list[Slot]:
        if n > len(self.free):
            raise RuntimeError(f"KV pool: {n} rows asked, {len(self.free)} free (call reserve first)")
        out = []
        for _ in range(n):
            s = Slot(heapq.heappop(self.free))
            self.holders[s.row] = s
            out.append(s)
        if out:
            self.lens[[s.row for s in out]] = 0
        return out

    def release(self, slot: Slot) -> None:
        if self.holders[slot.row] is slot:
            self.holders[slot.row] = None
            heapq.heappush(self.free, slot.row)

    def own(self, owner, slot: Slot) -> weakref.finalize:
        """Tie ``slot`` to ``owner``: its row is freed when ``owner`` is garbage collected."""
        fin = weakref.finalize(owner, self.release, slot)
        fin.atexit = False
        return fin

    def ensure(self, rows: int, positions: int) -> None:
        """Grow to at least ``rows`` rows in all and ``positions`` positions."""
        self.reserve(max(0, rows - self.rows + len(self.free)), positions)

    def pack(self, slots: list[Slot], front: bool = False) -> int:
        """Move the rows of ``slots`` into one window ``[lo, lo + len(slots))`` (in any order)
        and return ``lo``. The window is the one that already holds most of their used
        positions (a group of rows that starts together often lies in one stretch of the
        pool, e.g. a tree round's copies next to their sources: then nothing moves), the
        lowest such (``front``: the window ``[0, len(slots))``, for static shapes).
        Only slots outside it move, into its rows that are free or whose holders (other
        owners) move out to the rows vacated. All moves are one gather + one scatter per
        layer (every source is read before any write)."""
        n = len(slots)
        if not n or all(s.row < n for s in slots):
            return 0
        lo = 0 if front else self._window(slots)
        outside = [s for s in slots if not lo <= s.row < lo + n]
        if not outside:
            return lo
        mine = {id(s) for s in slots}
        holes = [r for r in range(lo, lo + n) if self.holders[r] is None or id(self.holders[r]) not in mine]
        evict = [self.holders[r] for r in holes if self.holders[r] is not None]
        vacated = [s.row for s in outside]
        src = [s.row for s in outside] + [h.row for h in evict]  # type: ignore[union-attr]
        dst = holes[: len(outside)] + vacated[: len(evict)]
        si, di = torch.tensor(src), torch.tensor(dst)
        lens = self.lens[si].clone()
        # Only positions in use move (a fresh row has none): rows are reused, so what lies
        # past a row's length is finite filler that attention masks out.
        used = (lens > 0).tolist()
        n = int(lens.max()) if any(used) else 0
        if n:
            sd = row_index([r for r, u in zip(src, used) if u], self.device)
            dd = row_index([r for r, u in zip(dst, used) if u], self.device)
            for store in (self.K, self.V):
                for t in store:
                    copy_positions(t, dd, t, sd, n)
        self.lens[di] = lens
        moved = outside + evict
        for h in moved:
            self.holders[h.row] = None  # type: ignore[union-attr]
        for h, r in zip(moved, dst):
            h.row = r  # type: ignore[union-attr]
            self.holders[r] = h
        self.free = [r for r, h in enumerate(self.holders) if h is None]
        heapq.heapify(self.free)
        return lo

    def _window(self, slots: list[Slot]) -> int:
        """The lowest start of a window of ``len(slots)`` pool rows that holds the most of
        the slots' positions in use (what a move copies; an empty row moves for free)."""
        n = len(slots)
        rows = torch.tensor([s.row for s in slots]).sort().values
        used = torch.cat([torch.zeros(1, dtype=torch.long), self.lens[rows].cumsum(0)])
        # Windows that start at a slot's row (clamped to the pool) include an optimal one.
        starts = torch.cat([torch.zeros(1, dtype=torch.long), rows.clamp(max=self.rows - n)])
        held = used[torch.searchsorted(rows, starts + n)] - used[torch.searchsorted(rows, starts)]
        best = held.max()
        return int(starts[held == best].min())
