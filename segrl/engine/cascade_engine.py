"""Tree decoding with cascade attention: a prompt's KV is stored once and read once per
decode step for all its rows, and the completion shared at a fork once for the rows below it.

:class:`Engine` gives every row its own ``DynamicCache`` copy of its path, so the 16 leaves of
a TreePO tree move 16 copies of the prompt and of every shared segment through memory at
every decode step, and the cache grows by concatenation. Here a node's cached state is a
*chain of blocks* plus a *private tail*:

* level 0 is the prefilled context (a prompt, or a fallback cut point's kept prefix);
* when a state is continued by k >= 2 rows (a fork) and its private tail is long
  (``fork_min_tokens``), its level-1 block (the completion shared up to its previous fork)
  plus its tail are copied once into a new level-1 block and the rows below it start with
  empty tails; a short shared tail is copied into each row's tail instead;
* each decode step scores each row against its private tail and, grouped by block, against
  the blocks it reads (one batched product per level), then takes one softmax over the union
  (:func:`~segrl.engine.cascade_attention.cascade_attention`). The KV a step reads is thus
  close to the *distinct* KV of the live trees, not rows x path length;
* a row's private tail is a row of a pool that outlives the call and is written in place (no
  concatenation); a state continued by one row hands its tail row on without a copy;
* the batch is kept in tail-pool row order, so the private attention reads the pool in
  place; one call decodes all its rows with continuous batching: at most
  ``max_batch_size`` at once, waiting rows start as others finish.

The decode step is a lean re-implementation of the LLaMA-family decoder layer (LLaMA,
SmolLM2, Qwen2, Mistral without sliding window) that calls the model's own modules (norms,
projections, LoRA adapters included, MLP, rotary embedding), so its log-probs equal the
transformers forward (to ~1e-5, tested). Prefill runs the transformers forward. Other
architectures: :func:`unsupported_reason` says why, and callers keep :class:`Engine`.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..tree import FinishReason
from .cascade_attention import cascade_attention, key_mask, level_indices
from .hf_engine import Engine
from .kv_pool import KVPool, Slot, copy_positions, row_index
from .sampling import sample_tokens

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model) -> str | None:
    """None if :class:`CascadeEngine` can decode this model, else why not."""
    base = _base(model)
    cfg = base.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "sliding_window", None) and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return "sliding-window attention"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        return "not a <Model>ForCausalLM with .model.layers and .lm_head"
    attn = inner.layers[0].self_attn
    if hasattr(attn, "q_norm") or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention layout differs from LLaMA's"
    return None


def _rms_norm(norm):
    """A function computing ``norm(x)``: one fused op for a LLaMA-style RMSNorm with fp32
    weights, else the module itself."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or norm.weight.dtype != torch.float32 or type(norm).__name__ not in _RMS_NORMS:
        return norm
    return functools.partial(torch.nn.functional.rms_norm, normalized_shape=norm.weight.shape, weight=norm.weight, eps=eps)


_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


#: Up to this many rows, :func:`_linear` computes ``(W @ x.T).T`` (see there).
FEW_ROWS = 64


def _linear(layer, bias: torch.Tensor | None = None) -> Callable:
    """A function computing ``x @ W.T + b`` for ``x [R, in]``; ``layer`` is an ``nn.Linear``
    or a weight ``W`` (with ``bias``). For fp32 weights on the CPU and at most
    :data:`FEW_ROWS` rows it computes ``(W @ x.T).T`` (a transposed view): with few rows that
    product streams the weights faster than ``F.linear``'s ``x @ W.T`` (a SmolLM2-135M decode
    step: 64 vs 84 ms at 8 rows, 124 vs 137 ms at 32; the same from 128 rows on, and 4%
    slower at 256 rows, so not there). Other modules (LoRA) are called as they are."""
    if isinstance(layer, torch.Tensor):
        w, b = layer, bias
    elif type(layer) is torch.nn.Linear:
        w, b = layer.weight, layer.bias
    else:
        return layer
    linear = functools.partial(torch.nn.functional.linear, weight=w, bias=b)
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return linear
    if b is None:
        return lambda x: torch.mm(w, x.t()).t() if x.shape[0] <= FEW_ROWS else linear(x)
    return lambda x: torch.addmm(b[:, None], w, x.t()).t() if x.shape[0] <= FEW_ROWS else linear(x)


class _LayerPlan(NamedTuple):
    """What a decode step calls in one decoder layer, looked up once per decode call."""

    norm1: Callable
    qkv: Callable | None  # the fused q/k/v projection, or None: call q/k/v_proj
    attn: torch.nn.Module
    o_proj: Callable
    norm2: Callable
    gate_up: Callable | None  # the fused gate/up projection, or None: call the MLP
    act: Callable | None
    down: Callable | None
    mlp: torch.nn.Module


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


class _Level:
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
            # moved more than it saved (TreePO on the embedded model: 20 of 30 ms per run);
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
        self.mask = key_mask(lengths.to(pool.device), T)
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
        self.gather = tuple(x if x is None else x.to(device) for x in level_indices(self.members, self.inverse, *self.heads))

    def part(self, li: int):
        """This level's arguments to :func:`cascade_attention` for layer ``li``."""
        K, V = self.layers[li]
        return (K, V, self.mask) + self.gather


class CascadeEngine(Engine):
    """:class:`Engine` with multi-level cascade-attention decoding (same API, same sampling,
    same random stream while a call fits in ``max_batch_size`` rows; a larger call starts
    waiting rows as others finish instead of decoding static batches one after another).

    Cached states are :class:`CascadeState` objects whose KV lives in pools owned by the
    engine (one per block level, one for private tails), reused across calls. A node inside
    a longer cached path (an SPO-chain boundary) gets a crop of it, copied into a private
    tail, where the crop lies past the level-0 context; :meth:`cache_prefix` crops one
    explicitly (TreePO's fallback points).
    """

    #: A state continued by several rows becomes a shared block only if its tail has at least
    #: this many tokens; a shorter tail is copied into each row's own tail. A block saves
    #: reading the tail once per extra row and step but costs one more grouped attention per
    #: layer and step, plus packing. With TreePO's 8-token segments on the embedded model,
    #: blocks at every fork were slower than copies (tree sampling 1.24 s vs 1.12 s); from
    #: 24 tokens (TreePO's last fork there, whose rows then decode to the end) a block is
    #: faster (0.93 s vs 0.95 s, 1.21 s vs 1.25 s; 16 tokens: 1.27 s; docs/benchmarks.md).
    fork_min_tokens = 24

    def __init__(self, model, tokenizer, *args, **kwargs):
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"CascadeEngine cannot decode this model: {why}")
        super().__init__(model, tokenizer, *args, **kwargs)
        base = _base(model)
        self._inner, self._lm_head = base.model, base.lm_head
        attn = self._inner.layers[0].self_attn
        self._heads = (base.config.num_attention_heads, base.config.num_key_value_heads, attn.head_dim)
        self._scaling = attn.scaling
        w = attn.k_proj.weight
        self._pool_args = (len(self._inner.layers), self._heads[1], self._heads[2], w.dtype, w.device)
        self._levels: list[KVPool] = []  # level l: the l-th block of states' chains
        self._fused_cache: dict[int, tuple] = {}
        D = self._heads[2]
        self._rot_sign = torch.cat([-torch.ones(D // 2), torch.ones(D - D // 2)]).to(w.device, w.dtype)
        self._tails = KVPool(*self._pool_args)
        self._consume = True

    def _pool(self, level: int) -> KVPool:
        while len(self._levels) <= level:
            self._levels.append(KVPool(*self._pool_args))
        return self._levels[level]

    def extend(self, refs, max_new_tokens, num_children=1, keep_kv=False, release_sources=True, **node_info):
        # A source that is released afterwards hands its tail row to its last child instead
        # of having it copied (all of a call's rows go to one _decode: _rows_per_decode).
        self._consume = release_sources
        return super().extend(refs, max_new_tokens, num_children, keep_kv, release_sources, **node_info)

    def _rows_per_decode(self) -> int:
        return sys.maxsize  # one call; it keeps <= max_batch_size rows decoding (continuous batching)

    def _crop(self, state: CascadeState, positions: int) -> CascadeState | None:
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
            keep, n, src_pool, src_row = chain[:2], n - m, self._tails, state.slot
        elif mid is not None:  # inside the level-1 block: copy its first n positions
            keep, src_pool, src_row = chain[:1], self._pool(1), mid.slot
        else:
            keep, src_pool, src_row = chain[:1], self._tails, state.slot
        if n == 0:
            return CascadeState(keep)
        tails = self._tails
        tails.reserve(1, n)
        slot = tails.alloc(1)[0]
        src = torch.tensor([src_row.row])  # type: ignore[union-attr]
        dst = torch.tensor([slot.row])
        for t, f in zip(tails.K + tails.V, src_pool.K + src_pool.V):
            copy_positions(t, dst, f, src, n)
        tails.lens[slot.row] = n
        out = CascadeState(keep, slot, n)
        out._fin = tails.own(out, slot)
        return out

    def _new_block(self, level: int, slot: Slot, length: int) -> Block:
        blk = Block(level, slot, length)
        blk._fin = self._pool(level).own(blk, slot)
        return blk

    def _prefill(self, refs):
        """Prefill with the transformers forward, then store each context as a level-0 block."""
        states = []
        pool = self._pool(0)
        for kv in super()._prefill(refs):
            if kv is None:  # an empty context (a one-token path)
                states.append(CascadeState(()))
                continue
            L = kv[0][0].shape[1]
            pool.reserve(1, L)
            slot = pool.alloc(1)[0]
            for li, (k, v) in enumerate(kv):
                pool.K[li][slot.row, :, :L] = k
                pool.V[li][slot.row, :, :L] = v
            pool.lens[slot.row] = L
            states.append(CascadeState((self._new_block(0, slot, L),)))
        return states

    # ----- one decode call --------------------------------------------------------------
    def _decode(self, rows, limits: list[int], keep_kv: bool):
        B = len(rows)
        for _, st, _ in rows:
            if st is not None and not isinstance(st, CascadeState):
                raise TypeError(f"CascadeEngine got a cached state of type {type(st).__name__}; states must come from this engine")
        uses: dict[int, int] = {}
        for _, st, _ in rows:
            uses[id(st)] = uses.get(id(st), 0) + 1
        empty = CascadeState(())
        states = [st if st is not None else empty for _, st, _ in rows]
        fork = [cs for cs in states if uses[id(cs)] > 1 and cs.own_len >= self.fork_min_tokens and cs._forked is None]
        forks = list({id(cs): cs for cs in fork}.values())
        self._fork(forks)
        chains: list[tuple[Block, ...]] = []
        slots: list[Slot | None] = [None] * B
        lens0 = [0] * B
        source: dict[int, CascadeState] = {}  # row -> the shared state its tail is copied from
        for r, cs in enumerate(states):
            if cs._forked is not None:
                chains.append(cs._forked)  # the tail is a block now: rows start with empty tails
                continue
            chains.append(cs.blocks)
            if not cs.own_len:
                continue
            lens0[r] = cs.own_len
            if self._consume and uses[id(cs)] == 1:
                slots[r] = cs.give_up_slot()
            else:
                source[r] = cs
        tails = self._tails
        if self._consume:  # a forked source's tail is in its block now
            for cs in {id(cs): cs for cs in states if cs._forked is not None and cs.slot is not None}.values():
                tails.release(cs.give_up_slot())
        # A source that is released afterwards hands its tail row to its last row (which
        # starts after its siblings have copied it); the other rows copy it.
        heirs = {id(cs): r for r, cs in source.items()} if self._consume else {}
        positions = max(l + n for l, n in zip(lens0, limits))

        def start(rs: list[int]) -> None:
            """Give rows ``rs`` their tails (a fresh pool row, a copy of a shared source's
            tail, or the source's own row). Tails are set up when a row starts, so memory
            follows the rows decoding, not all the rows of the call."""
            heir = [r for r in rs if heirs.get(id(source.get(r))) == r]
            fresh = [r for r in rs if slots[r] is None and heirs.get(id(source.get(r))) != r]
            tails.reserve(len(fresh), positions)
            for r, slot in zip(fresh, tails.alloc(len(fresh))):
                slots[r] = slot
            cp = [r for r in fresh if r in source]
            if cp:
                drows = [slots[r].row for r in cp]  # type: ignore[union-attr]
                dst = row_index(drows, tails.device)
                src = row_index([source[r].slot.row for r in cp], tails.device)  # type: ignore[union-attr]
                n = max(lens0[r] for r in cp)
                for t in tails.K + tails.V:
                    copy_positions(t, dst, t, src, n)
                tails.lens[drows] = torch.tensor([lens0[r] for r in cp])  # so that pack moves them
            for r in heir:
                slots[r] = source[r].give_up_slot()

        # Continuous batching: at most max_batch_size rows decode at once; a waiting row
        # starts as soon as enough others have finished.
        cap = max(1, self.max_batch_size)
        waiting = list(range(cap, B))
        refill = max(1, cap // 16)  # start waiting rows in groups: each start re-packs
        alive = list(range(min(B, cap)))
        paths = [p for _, _, p in rows]
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        kvs: list[CascadeState | None] = [None] * B
        prm = self.params
        plan = self._plan()
        index = self._chain_index(chains)
        try:
            start(alive)
            alive, trow, order, levels, inp, pos, lo = self._repack(alive, slots, index, paths, toks)
            buf = (lo, len(alive))  # the private attention runs over tail-pool rows [lo, lo + n)
            while alive:
                logits = self._step(inp, pos, trow.to(self.device), buf, levels, plan)
                tok, lp = sample_tokens(logits.cpu(), prm.temperature, prm.top_p, prm.top_k, self.device_generator, order)
                self.stats.forward_calls += 1
                self.stats.decode_tokens += len(alive)
                tails.lens[trow] += 1
                keep, ended = self._record(alive, tok, lp, toks, lps, paths, limits, reasons)
                for _, r in ended:
                    slot = slots[r]
                    slots[r] = None
                    if keep_kv or reasons[r] == FinishReason.SEGMENT:
                        st = kvs[r] = CascadeState(chains[r], slot, lens0[r] + len(toks[r]))  # the tail's length
                        st._fin = tails.own(st, slot)  # type: ignore[arg-type]
                    else:
                        tails.release(slot)  # type: ignore[arg-type]
                if len(keep) == len(alive):
                    inp, pos = tok.to(self.device), pos + 1
                    continue
                alive = [alive[b] for b in keep]
                new = waiting[: cap - len(alive)] if waiting and cap - len(alive) >= min(refill, len(waiting)) else []
                if new or 2 * len(alive) <= buf[1]:
                    # Rows start, or half the rows attended are dead: pack the live rows into
                    # one window (back in pool-row order), keep only the blocks they read.
                    del waiting[: len(new)]
                    if not alive and not new:
                        break
                    start(new)
                    alive, trow, order, levels, inp, pos, lo = self._repack(alive + new, slots, index, paths, toks)
                    buf = (lo, len(alive))
                else:
                    at = torch.tensor(alive)
                    for lv in levels:
                        lv.index(at, self.device)
                    kt = torch.tensor(keep)
                    inp, pos = tok[kt].to(self.device), pos[kt.to(self.device)] + 1
                    trow, order = self._batch_order(alive, slots)
        finally:
            for r in range(B):  # rows cut short by an error
                if slots[r] is not None:
                    tails.release(slots[r])  # type: ignore[arg-type]
        return [(toks[r], lps[r], reasons[r], kvs[r]) for r in range(B)]

    def _repack(self, rows: list[int], slots, index, paths, toks):
        """Pack the tails of ``rows`` into one window of pool rows ``[lo, lo + len(rows))``
        and order the batch by pool row (batch position b = tail row lo + b: the private
        attention then runs in place, with no scatter/gather); ``order`` deals the random
        draws in row order. Returns ``(rows in batch order, tail rows, order, levels, next
        inputs, positions, lo)``."""
        lo = self._tails.pack([slots[r] for r in rows])
        rows = sorted(rows, key=lambda r: slots[r].row)
        trow, order = self._batch_order(rows, slots)
        inp = torch.tensor([toks[r][-1] if toks[r] else paths[r][-1] for r in rows], device=self.device)
        pos = torch.tensor([len(paths[r]) - 1 + len(toks[r]) for r in rows], device=self.device)
        return rows, trow, order, self._levels_for(index, rows), inp, pos, lo

    @staticmethod
    def _batch_order(alive: list[int], slots) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tail-pool row of each batch position, rank of each batch position's row among
        the live rows)``; the rank is None when the batch is in row order already."""
        trow = torch.tensor([slots[r].row for r in alive])
        if all(a < b for a, b in zip(alive, alive[1:])):
            return trow, None
        return trow, torch.argsort(torch.argsort(torch.tensor(alive)))

    @staticmethod
    def _chain_index(chains: list[tuple[Block, ...]]) -> list[tuple[torch.Tensor, list[Block]]]:
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

    def _levels_for(self, index: list[tuple[torch.Tensor, list[Block]]], alive) -> list[_Level]:
        """The levels read by the rows ``alive`` (of :meth:`_chain_index`), indexed for them."""
        at = torch.tensor(list(alive), dtype=torch.long)
        levels = []
        for level, (bid, blocks) in enumerate(index):
            live = torch.full_like(bid, -1)
            live[at] = bid[at]
            if not bool((live >= 0).any()):
                break  # chains are prefixes: no live row reads a deeper level either
            levels.append(_Level(live, blocks, self._pool(level), self._heads[:2]))
        for lv in levels:
            lv.index(at, self.device)
        return levels

    def _fork(self, forks: list[CascadeState]) -> None:
        """Give each forked state a level-1 block = its level-1 block (the completion shared
        up to its last fork, if any) + its private tail, copied once. Two levels at most:
        a chain of one block per fork would read each stretch once, but costs one more
        grouped attention per level and decode step, which outweighs it for short
        segments; this way a stretch is read at most once per fork below it."""
        if not forks:
            return
        pool, T = self._pool(1), self._tails
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
            cs._forked = cs.blocks[:1] + (self._new_block(1, slot, a + b),)

    def _step(self, inp, pos, trow, buf: tuple[int, int], levels: list[_Level], plan: list[_LayerPlan]) -> torch.Tensor:
        """One decode step for the live rows; returns next-token logits ``[R, V]``.

        ``trow``: each live row's tail-pool row (all within the window ``buf = (lo, n)``:
        rows ``[lo, lo + n)``, attended in place; outputs of dead rows there are dropped); the
        new token goes at the row's current length. Each level's blocks are attended grouped."""
        Hq, Hkv, D = self._heads
        R = inp.shape[0]
        tails = self._tails
        lo, nbuf = buf
        at = tails.lens[trow.cpu()].to(self.device)
        T = int(at.max()) + 1
        brow = trow - lo  # row in the window
        dense = R == nbuf and bool((brow == torch.arange(R, device=trow.device)).all())
        valid = tails.lens[lo : lo + nbuf].to(self.device) + 0
        valid[brow] = at + 1
        mask = key_mask(valid, T)  # once per step, for every layer
        # Where each row's new key/value goes in a layer's pool viewed as [rows*Hkv*P, D]:
        # one index_copy_ per layer and store (advanced-index assignment cost ~4x as much).
        P = tails.K[0].shape[2]
        put = ((trow[:, None] * Hkv + torch.arange(Hkv, device=trow.device)) * P + at[:, None]).reshape(-1)
        x = self._inner.embed_tokens(inp)  # [R, hidden]
        cos, sin = self._inner.rotary_emb(x[:, None], pos[:, None])  # [R, 1, D]
        cos, sin = cos[:, 0, None, :], sin[:, 0, None, :] * self._rot_sign  # rotate_half(x)*sin = roll(x)*sin'
        for li, lp in enumerate(plan):
            h = lp.norm1(x)
            if lp.qkv is not None:
                qkv = lp.qkv(h).contiguous()
            else:
                attn = lp.attn
                qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1)
            qk = qkv[:, : (Hq + Hkv) * D].view(R, Hq + Hkv, D)
            qk = qk * cos + torch.roll(qk, D // 2, -1) * sin  # rotary embedding of q and k at once
            q = qk[:, :Hq] * self._scaling  # [R, Hq, D]
            K, V = tails.K[li], tails.V[li]
            K.view(-1, D).index_copy_(0, put, qk[:, Hq:].reshape(R * Hkv, D))
            V.view(-1, D).index_copy_(0, put, qkv[:, (Hq + Hkv) * D :].reshape(R * Hkv, D))
            private = (K[lo : lo + nbuf, :, :T], V[lo : lo + nbuf, :, :T], mask, None if dense else brow)
            o = cascade_attention(q, private, [lv.part(li) for lv in levels])
            x = x + lp.o_proj(o.to(x.dtype).reshape(R, Hq * D))
            h = lp.norm2(x)
            if lp.gate_up is not None:
                g, u = lp.gate_up(h).chunk(2, -1)
                x = x + lp.down(lp.act(g) * u)  # type: ignore[misc]
            else:
                x = x + lp.mlp(h)
        return self._head(self._final_norm(x)).contiguous()

    def _plan(self) -> list[_LayerPlan]:
        """Per layer, the modules and fused weights a decode step uses (once per call: the
        weights do not change while it decodes)."""
        self._final_norm = _rms_norm(self._inner.norm)
        self._head = _linear(self._lm_head)
        plan = []
        for li, layer in enumerate(self._inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = self._fused(li, layer)
            down = getattr(mlp, "down_proj", None)
            plan.append(_LayerPlan(
                _rms_norm(layer.input_layernorm), None if qkv is None else _linear(*qkv),
                attn, _linear(attn.o_proj), _rms_norm(layer.post_attention_layernorm),
                None if gate_up is None else _linear(gate_up), getattr(mlp, "act_fn", None), None if down is None else _linear(down), mlp,
            ))
        return plan

    def _fused(self, li: int, layer):
        """``((W_qkv, b_qkv), W_gate_up)`` concatenated from the layer's plain ``nn.Linear``
        projections (one matrix product instead of three / two per decode step), or None
        where they are wrapped (LoRA) or differ. Rebuilt when any weight changes (the
        optimizer's in-place updates bump the tensors' version counters)."""
        attn, mlp = layer.self_attn, layer.mlp
        lin = torch.nn.Linear
        qkv_mods = (attn.q_proj, attn.k_proj, attn.v_proj)
        gu_mods = (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None))
        ok_qkv = all(type(m) is lin for m in qkv_mods) and len({m.bias is None for m in qkv_mods}) == 1
        ok_gu = all(type(m) is lin and m.bias is None for m in gu_mods) and hasattr(mlp, "act_fn") and hasattr(mlp, "down_proj")
        params = [p for m in qkv_mods + gu_mods if isinstance(m, torch.nn.Module) for p in m.parameters(recurse=False)]
        key = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._fused_cache.get(li)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            qkv = None
            if ok_qkv:
                b = None if attn.q_proj.bias is None else torch.cat([m.bias for m in qkv_mods])
                qkv = (torch.cat([m.weight for m in qkv_mods]), b)
            gu = torch.cat([m.weight for m in gu_mods]) if ok_gu else None
        self._fused_cache[li] = (key, (qkv, gu))
        return qkv, gu
