"""Attention metadata of the shared blocks a decode call reads (vLLM's cascade "metadata").

Per block level, :class:`LevelView` says which blocks the call's rows read, where they lie in
the level's pool (attended in place in one window of rows, packed when sparse) and which rows
read which block (grouped queries), as the gather indices of
:func:`~segrl.engine.cascade_attention.level_indices`.
"""

from __future__ import annotations

import torch

from .cascade_attention import key_mask, level_indices
from .kv_manager import Block, KVManager
from .kv_pool import KVPool


class LevelView:
    """The blocks of one level that a decode call reads, attended in place in one window of
    that level's pool rows (packed into one when they are sparse), and which rows read which
    (grouped queries)."""

    def __init__(self, bid: torch.Tensor, blocks: list[Block], pool: KVPool, heads: tuple[int, int]):
        """``bid [B]``: for each row of the call, the index in ``blocks`` of the block of this
        level it reads, -1 for none (or a row not decoding now); ``heads``: ``(Hq, Hkv)``."""
        self.heads = heads
        readers = (bid >= 0).nonzero().squeeze(1)
        used = torch.unique(bid[readers])
        mine = [blocks[c] for c in used.tolist()]
        rows = [b.slot.row for b in mine]
        lo, hi = min(rows), max(rows) + 1
        if 2 * len(mine) <= hi - lo:
            # At least half the rows of the window [lo, hi) of the blocks read are not read:
            # pack the blocks read into n rows. Otherwise attend the window in place,
            # unread rows included (their scores are never picked). Packing at every re-pack
            # moved more than it saved (TreePO on the embedded model);
            # the window, not [0, hi), keeps a tree's last round from packing as its first
            # rows' blocks are released (continuous batching reads blocks in row order).
            lo = pool.pack([b.slot for b in mine])
            rows = [b.slot.row for b in mine]
            hi = max(rows) + 1
        N, B = hi - lo, bid.shape[0]
        row = torch.full((len(blocks),), -1, dtype=torch.long)
        row[used] = torch.tensor(rows) - lo  # window row (< N) of each block read
        lengths = torch.zeros(N, dtype=torch.long)  # 0: a row no reader reads
        lengths[row[used]] = torch.tensor([b.length for b in mine])
        T = int(lengths.max())
        self.layers = [(K[lo:hi, :, :T], V[lo:hi, :, :T]) for K, V in zip(pool.K, pool.V)]
        self.mask = key_mask(lengths.to(pool.device, non_blocking=True), T)
        # Readers grouped by block (pool row), each block's readers in row order.
        at = row[bid[readers]]
        counts = torch.bincount(at, minlength=N)
        S = int(counts.max())
        sorted_at, by = torch.sort(at, stable=True)
        rank = torch.empty_like(at)
        rank[by] = torch.arange(len(at)) - (torch.cumsum(counts, 0) - counts)[sorted_at]
        self.dummy = N * S  # flat slot of rows that read no block of this level
        flat = torch.full((N * S,), B, dtype=torch.long)
        flat[at * S + rank] = readers
        slot = torch.full((B,), self.dummy, dtype=torch.long)
        slot[readers] = at * S + rank
        self.members_orig = flat.view(N, S)
        self.slot_orig = slot
        self.members = self.inverse = self.gather = None

    def index(self, alive: torch.Tensor, device) -> None:
        """Point the slots at the live rows' batch positions (a dead row's slot becomes
        padding) and build the gather indices of :func:`level_indices` for them."""
        B, live = self.slot_orig.shape[0], alive.shape[0]
        pos = torch.full((B + 1,), live, dtype=torch.long)
        pos[alive] = torch.arange(live)
        self.members = pos[self.members_orig]
        self.inverse = self.slot_orig[alive]
        idx = level_indices(self.members, self.inverse, *self.heads)
        self.gather = tuple(x if x is None else x.to(device, non_blocking=True) for x in idx)

    def part(self, li: int):
        """This level's arguments to :func:`cascade_attention` for layer ``li``."""
        K, V = self.layers[li]
        return (K, V, self.mask) + self.gather


def chain_index(chains: list[tuple[Block, ...]]) -> list[tuple[torch.Tensor, list[Block]]]:
    """Per level: the index of the block each row reads (-1: none) and the blocks. Once per
    call (a row's chain does not change while it decodes), so that each re-pack builds
    its levels with tensor operations instead of a walk over every row."""
    out = []
    for level in range(max((len(c) for c in chains), default=0)):
        ids: dict[int, int] = {}
        blocks: list[Block] = []
        bid = [-1] * len(chains)
        for r, c in enumerate(chains):
            if len(c) > level:
                k = ids.get(id(c[level]))
                if k is None:
                    k = ids[id(c[level])] = len(blocks)
                    blocks.append(c[level])
                bid[r] = k
        out.append((torch.tensor(bid, dtype=torch.long), blocks))
    return out


def levels_for(index: list[tuple[torch.Tensor, list[Block]]], alive, kv: KVManager, heads: tuple[int, int], device) -> list[LevelView]:
    """The levels read by the rows ``alive`` (of :func:`chain_index`), indexed for them."""
    at = torch.tensor(list(alive), dtype=torch.long)
    levels = []
    for level, (bid, blocks) in enumerate(index):
        live = torch.full_like(bid, -1)
        live[at] = bid[at]
        if not bool((live >= 0).any()):
            break  # chains are prefixes: no live row reads a deeper level either
        levels.append(LevelView(live, blocks, kv.pool(level), heads))
    for lv in levels:
        lv.index(at, device)
    return levels
