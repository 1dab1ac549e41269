"""The pool engine's scheduler: one decode call with continuous batching over KV pools.

A call gets rows (each continuing a cached :class:`~segrl.engine.kv_manager.CascadeState`)
and decodes them with at most ``max_batch_size`` rows at once; waiting rows start as others
finish. A row's private tail is set up when it starts (a fresh pool row, a copy of a shared
source's tail, or the source's own row when the source is released afterwards and this is
its last row), so memory follows the rows decoding, not all the rows of the call.

The batch is kept in tail-pool row order inside one window of pool rows (re-packed when rows
start or half the window's rows have died), so the private attention reads the pool in place;
``order`` deals each step's random draws in row order, so a call samples what it would with
its rows in any other batch order.
"""

from __future__ import annotations

import torch

from ..tree import FinishReason
from .cascade_levels import chain_index, levels_for
from .finish import RowLog
from .kv_manager import Block, CascadeState
from .kv_pool import Slot, copy_positions, row_index


class CascadeDecode:
    """One :meth:`CascadeEngine._decode` call (see the module docstring).

    Args:
        engine: the :class:`~segrl.engine.cascade_engine.CascadeEngine`.
        rows: ``(ref index, state, path)`` per row.
        limits: each row's token limit.
        keep_kv: keep the states of rows that end on EOS / stop too.
        consume: the sources are released after the call (their tail rows may be handed on).
    """

    def __init__(self, engine, rows, limits: list[int], keep_kv: bool, consume: bool):
        self.eng = engine
        self.kv = engine._kv
        self.keep_kv = keep_kv
        self.consume = consume
        self.B = B = len(rows)
        self.paths = [p for _, _, p in rows]
        self.limits = limits
        self.log = RowLog(limits, engine._stops)
        self.kvs: list[CascadeState | None] = [None] * B
        self.slots: list[Slot | None] = [None] * B
        self.lens0 = [0] * B
        self.source: dict[int, CascadeState] = {}  # row -> the shared state its tail is copied from
        self.chains = self._setup([st for _, st, _ in rows])
        # A source that is released afterwards hands its tail row to its last row (which
        # starts after its siblings have copied it); the other rows copy it.
        self.heirs = {id(cs): r for r, cs in self.source.items()} if consume else {}
        self.positions = max(l + n for l, n in zip(self.lens0, limits))
        self.index = chain_index(self.chains)

    def _setup(self, raw) -> list[tuple[Block, ...]]:
        """Fork the states continued by several rows; each row's block chain and tail source."""
        for st in raw:
            if st is not None and not isinstance(st, CascadeState):
                raise TypeError(f"CascadeEngine got a cached state of type {type(st).__name__}; states must come from this engine")
        uses: dict[int, int] = {}
        for st in raw:
            uses[id(st)] = uses.get(id(st), 0) + 1
        empty = CascadeState(())
        states = [st if st is not None else empty for st in raw]
        fork_min = self.eng.fork_min_tokens
        fork = [cs for cs in states if uses[id(cs)] > 1 and cs.own_len >= fork_min and cs._forked is None]
        self.kv.fork(list({id(cs): cs for cs in fork}.values()))
        chains: list[tuple[Block, ...]] = []
        for r, cs in enumerate(states):
            if cs._forked is not None:
                chains.append(cs._forked)  # the tail is a block now: rows start with empty tails
                continue
            chains.append(cs.blocks)
            if not cs.own_len:
                continue
            self.lens0[r] = cs.own_len
            if self.consume and uses[id(cs)] == 1:
                self.slots[r] = cs.give_up_slot()
            else:
                self.source[r] = cs
        if self.consume:  # a forked source's tail is in its block now
            for cs in {id(cs): cs for cs in states if cs._forked is not None and cs.slot is not None}.values():
                self.kv.tails.release(cs.give_up_slot())
        return chains

    def start(self, rs: list[int]) -> None:
        """Give rows ``rs`` their tails (a fresh pool row, a copy of a shared source's tail,
        or the source's own row)."""
        tails, slots, source, heirs = self.kv.tails, self.slots, self.source, self.heirs
        heir = [r for r in rs if heirs.get(id(source.get(r))) == r]
        fresh = [r for r in rs if slots[r] is None and heirs.get(id(source.get(r))) != r]
        tails.reserve(len(fresh), self.positions)
        for r, slot in zip(fresh, tails.alloc(len(fresh))):
            slots[r] = slot
        cp = [r for r in fresh if r in source]
        if cp:
            drows = [slots[r].row for r in cp]  # type: ignore[union-attr]
            dst = row_index(drows, tails.device)
            src = row_index([source[r].slot.row for r in cp], tails.device)  # type: ignore[union-attr]
            n = max(self.lens0[r] for r in cp)
            for t in tails.K + tails.V:
                copy_positions(t, dst, t, src, n)
            tails.lens[drows] = torch.tensor([self.lens0[r] for r in cp])  # so that pack moves them
        for r in heir:
            slots[r] = source[r].give_up_slot()

    def run(self):
        """Decode every row; returns ``(tokens, logprobs, finish_reason, state|None)`` per row."""
        eng, B = self.eng, self.B
        cap = max(1, eng.max_batch_size)
        self.waiting = list(range(cap, B))
        self.refill = max(1, cap // 16)  # start waiting rows in groups: each start re-packs
        self.plan = eng._runner.plan()
        try:
            alive = list(range(min(B, cap)))
            self.start(alive)
            self.repack(alive)
            while self.alive:
                tok, lp = eng._sample(self.logits(), self.order)
                eng.stats.forward_calls += 1
                eng.stats.decode_tokens += len(self.alive)
                self.kv.tails.lens[self.trow] += 1
                keep, ended = self.log.record(self.alive, tok, lp)
                self.finish([r for _, r in ended])
                if not self.advance(tok, keep, cap):
                    break
        finally:
            for r in range(B):  # rows cut short by an error
                if self.slots[r] is not None:
                    self.kv.tails.release(self.slots[r])  # type: ignore[arg-type]
            self.close()
        lps = self.log.logprobs()
        return [(self.log.tokens(r), lps[r], self.log.reasons[r], self.kvs[r]) for r in range(B)]

    # ----- hooks of the static-shape decode (segrl.engine.cuda_graphs) ---------------------
    def logits(self) -> torch.Tensor:
        """Next-token logits of the live rows, in batch order."""
        return self.eng._step(self.inp, self.pos, self.trow, self.buf, self.levels, self.plan)

    def pack(self, slots: list[Slot]) -> int:
        """Pack the tail rows of ``slots`` into one window; returns its first row."""
        return self.kv.tails.pack(slots)

    def close(self) -> None:
        """Called once the call is over (also after an error)."""

    def finish(self, ended: list[int]) -> None:
        """Rows that ended keep their state (a segment's end, or ``keep_kv``) or free it."""
        for r in ended:
            slot, self.slots[r] = self.slots[r], None
            if self.keep_kv or self.log.reasons[r] == FinishReason.SEGMENT:
                self.kvs[r] = self.kv.own_tail(slot, self.lens0[r] + self.log.count(r), self.chains[r])  # type: ignore[arg-type]
            else:
                self.kv.tails.release(slot)  # type: ignore[arg-type]

    def advance(self, tok: torch.Tensor, keep: list[int], cap: int) -> bool:
        """Set up the next step after rows ``keep`` (batch positions) go on; False: done."""
        dev = self.eng.device
        if len(keep) == len(self.alive):
            self.inp, self.pos = tok, self.pos + 1
            return True
        alive = [self.alive[b] for b in keep]
        waiting = self.waiting
        new = waiting[: cap - len(alive)] if waiting and cap - len(alive) >= min(self.refill, len(waiting)) else []
        if new or 2 * len(alive) <= self.buf[1]:
            # Rows start, or half the rows attended are dead: pack the live rows into one
            # window (back in pool-row order), keep only the blocks they read.
            del waiting[: len(new)]
            if not alive and not new:
                return False
            self.start(new)
            self.repack(alive + new)
            return True
        self.alive = alive
        at = torch.tensor(alive)
        for lv in self.levels:
            lv.index(at, dev)
        kt = torch.tensor(keep).to(dev, non_blocking=True)
        self.inp, self.pos = tok[kt], self.pos[kt] + 1
        self.trow, self.order = self.batch_order(alive)
        return True

    def repack(self, rows: list[int]) -> None:
        """Pack the tails of ``rows`` into one window of pool rows ``[lo, lo + len(rows))``
        and order the batch by pool row (batch position b = tail row lo + b: the private
        attention then runs in place, with no scatter/gather); ``order`` deals the random
        draws in row order."""
        slots, log, paths, dev = self.slots, self.log, self.paths, self.eng.device
        lo = self.pack([slots[r] for r in rows])
        rows = sorted(rows, key=lambda r: slots[r].row)  # type: ignore[union-attr]
        self.alive = rows
        self.trow, self.order = self.batch_order(rows)
        last = [log.last(r) for r in rows]
        self.inp = torch.tensor([paths[r][-1] if t is None else t for r, t in zip(rows, last)]).to(dev, non_blocking=True)
        self.pos = torch.tensor([len(paths[r]) - 1 + log.count(r) for r in rows]).to(dev, non_blocking=True)
        self.levels = levels_for(self.index, rows, self.kv, self.eng._runner.heads[:2], dev)
        self.buf = (lo, len(rows))  # the private attention runs over tail-pool rows [lo, lo + n)

    def batch_order(self, alive: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tail-pool row of each batch position, rank of each batch position's row among
        the live rows)``; the rank is None when the batch is in row order already."""
        trow = torch.tensor([self.slots[r].row for r in alive])  # type: ignore[union-attr]
        if all(a < b for a, b in zip(alive, alive[1:])):
            return trow, None
        return trow, torch.argsort(torch.argsort(torch.tensor(alive)))
