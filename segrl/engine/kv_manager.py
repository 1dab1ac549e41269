"""The pool engine's KV manager: cached node states as chains of shared blocks + a private tail.

A node's cached state (its path's KV minus the last token) is a :class:`CascadeState`:

* level 0 is the prefilled context (a prompt, or a fallback cut point's kept prefix);
* when a state is continued by k >= 2 rows (a fork) and its private tail is long, its
  level-1 block (the completion shared up to its previous fork) plus its tail are copied
  once into a new level-1 block (:meth:`KVManager.fork`), and the rows below it start with
  empty tails; a short shared tail is copied into each row's tail instead;
* a row's private tail is a row of the tail pool that outlives a decode call and is
  written in place.

In the ``flat`` layout there are no blocks: a prefilled context goes into the row's own tail
(:meth:`KVManager.store_context`), and forks copy it, so every decoding row reads one pool row
(static shapes for CUDA graphs). Pool rows are freed when the states holding them are
dropped (:meth:`segrl.engine.kv_pool.KVPool.own`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .kv_pool import KVPool, Slot, copy_positions, row_index


@dataclass(eq=False)
class Block:
    """KV of one stretch of a path that several rows share, stored once in a row of its
    level's pool; the row is freed when the last state holding the block is dropped."""

    level: int
    slot: Slot
    length: int
    _fin: weakref.finalize | None = field(default=None, repr=False)


@dataclass(eq=False)
class CascadeState:
    """A node's cached state (its path's KV minus the last token) = shared ``blocks`` (one per
    level, outermost first) + a private tail in a row of the engine's tail pool (``own_len``
    positions; ``slot`` None when the tail is empty)."""

    blocks: tuple[Block, ...]
    slot: Slot | None = None
    own_len: int = 0
    _fin: weakref.finalize | None = field(default=None, repr=False)
    _forked: tuple[Block, ...] | None = field(default=None, repr=False)  # blocks + the tail as a block

    def give_up_slot(self) -> Slot:
        """Hand the tail row to a new owner (this state no longer holds a tail)."""
        slot = self.slot
        if self._fin is not None:
            self._fin.detach()
        self.slot, self.own_len, self._fin = None, 0, None
        return slot  # type: ignore[return-value]


class KVManager:
    """The pools of one engine (one per block level, one for private tails) and the states
    built in them.

    Args:
        pool_args: ``(layers, kv_heads, head_dim, dtype, device)`` of every pool.
        flat: the ``flat`` layout (no shared blocks; see the module docstring).
    """

    def __init__(self, pool_args: tuple, flat: bool = False):
        self.pool_args = pool_args
        self.flat = flat
        self.levels: list[KVPool] = []  # level l: the l-th block of states' chains
        self.tails = KVPool(*pool_args)

    def pool(self, level: int) -> KVPool:
        while len(self.levels) <= level:
            self.levels.append(KVPool(*self.pool_args))
        return self.levels[level]

    def new_block(self, level: int, slot: Slot, length: int) -> Block:
        blk = Block(level, slot, length)
        blk._fin = self.pool(level).own(blk, slot)
        return blk

    def own_tail(self, slot: Slot, length: int, blocks: tuple[Block, ...] = ()) -> CascadeState:
        """A state whose private tail is ``slot`` (``length`` positions) after ``blocks``."""
        st = CascadeState(blocks, slot, length)
        st._fin = self.tails.own(st, slot)
        return st

    def store_context(self, kv) -> CascadeState:
        """The state of a prefilled context (per layer ``(K, V [Hkv, L, D])``; None: empty):
        a level-0 block, or (flat) the row's private tail."""
        if kv is None:  # an empty context (a one-token path)
            return CascadeState(())
        L = kv[0][0].shape[1]
        pool = self.tails if self.flat else self.pool(0)
        pool.reserve(1, L)
        slot = pool.alloc(1)[0]
        for li, (k, v) in enumerate(kv):
            pool.K[li][slot.row, :, :L] = k
            pool.V[li][slot.row, :, :L] = v
        pool.lens[slot.row] = L
        if self.flat:
            return self.own_tail(slot, L)
        return CascadeState((self.new_block(0, slot, L),))

    def crop(self, state: CascadeState, positions: int) -> CascadeState | None:
        """The first ``positions`` positions of ``state``: its level-0 block, its level-1 block
        if the crop reaches past it, and the rest copied into a new private tail (a crop inside
        the level-1 block copies that part of the block). None inside the level-0 context
        (a prefilled block is not split: the node is prefilled instead)."""
        if not isinstance(state, CascadeState):
            return None
        chain, own = (state._forked, 0) if state._forked is not None else (state.blocks, state.own_len)
        l0 = chain[0].length if chain else 0
        if positions < l0 or positions > l0 + sum(b.length for b in chain[1:]) + own:
            return None
        mid = chain[1] if len(chain) > 1 else None
        m = mid.length if mid is not None else 0
        n = positions - l0
        if n == 0:
            return CascadeState(chain[:1])
        if mid is not None and n >= m:
            keep, n, src_pool, src_row = chain[:2], n - m, self.tails, state.slot
        elif mid is not None:  # inside the level-1 block: copy its first n positions
            keep, src_pool, src_row = chain[:1], self.pool(1), mid.slot
        else:
            keep, src_pool, src_row = chain[:1], self.tails, state.slot
        if n == 0:
            return CascadeState(keep)
        tails = self.tails
        tails.reserve(1, n)
        slot = tails.alloc(1)[0]
        src = row_index([src_row.row], tails.device)  # type: ignore[union-attr]
        dst = row_index([slot.row], tails.device)
        for t, f in zip(tails.K + tails.V, src_pool.K + src_pool.V):
            copy_positions(t, dst, f, src, n)
        tails.lens[slot.row] = n
        return self.own_tail(slot, n, keep)

    def fork(self, forks: list[CascadeState]) -> None:
        """Give each forked state a level-1 block = its level-1 block (the completion shared
        up to its last fork, if any) + its private tail, copied once. Two levels at most:
        a chain of one block per fork would read each stretch once, but costs one more
        grouped attention per level and decode step, which outweighs it for short
        segments; this way a stretch is read at most once per fork below it."""
        if not forks:
            return
        pool, T = self.pool(1), self.tails
        mids = [cs.blocks[1] if len(cs.blocks) > 1 else None for cs in forks]
        m = [b.length if b is not None else 0 for b in mids]
        n = [cs.own_len for cs in forks]
        F, mmax, nmax = len(forks), max(m), max(n)
        pool.reserve(F, mmax + nmax)  # (copies run nmax past a shorter tail: masked filler)
        new = pool.alloc(F)
        rows = [s.row for s in new]
        dev = pool.device
        if mmax:  # rows are copied whole up to mmax: past a block's length is masked filler
            wm = [i for i, b in enumerate(mids) if b is not None]
            mdst = row_index([rows[i] for i in wm], dev)
            msrc = row_index([mids[i].slot.row for i in wm], dev)  # type: ignore[union-attr]
        # A fork's tail goes after its level-1 part: one slice copy per distinct offset.
        by_offset: dict[int, list[int]] = {}
        for i, a in enumerate(m):
            by_offset.setdefault(a, []).append(i)
        moves = [
            (a, row_index([rows[i] for i in idx], dev), row_index([forks[i].slot.row for i in idx], dev))  # type: ignore[union-attr]
            for a, idx in by_offset.items()
        ]
        for P, Tt in zip(pool.K + pool.V, T.K + T.V):
            if mmax:
                copy_positions(P, mdst, P, msrc, mmax)
            for a, d, src in moves:
                copy_positions(P, d, Tt, src, nmax, at=a)
        pool.lens[rows] = torch.tensor([a + b for a, b in zip(m, n)])
        for cs, slot, a, b in zip(forks, new, m, n):
            cs._forked = cs.blocks[:1] + (self.new_block(1, slot, a + b),)
