"""Tree decoding with cascade attention: shared prefixes are stored and read once.

:class:`Engine` gives every row its own copy of its path's KV (``DynamicCache``), so a tree
whose 8 leaves share a prompt and a few segments still moves 8 copies of them through memory
at every decode step, and the cache grows by concatenation. This engine keeps a node's
state as a *chain of shared blocks* plus a *private tail*:

* a block (a prompt's prefill, or the tokens a node decoded before it forked) is stored
  once; each decode step reads it once for all the rows below it
  (:func:`~segrl.engine.cascade_attention.grouped_partial_attention`);
* a row's private tail lives in a buffer allocated once per :meth:`extend` call and written
  in place, so nothing is concatenated per step;
* a node extended with one child hands its tail on (copied once per call); a node extended
  with k >= 2 children turns its tail into a new shared block (no copy).

The decode step is a lean re-implementation of the LLaMA-family decoder layer (LLaMA,
SmolLM2, Qwen2, Mistral without sliding window) that calls the model's own modules (norms,
projections, LoRA adapters included, MLP, rotary embedding), so its logits equal the
transformers forward (to ~1e-6, tested). Prefill still runs the transformers forward.
Other architectures: :func:`unsupported_reason` says why, and callers use :class:`Engine`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..tree import FinishReason
from .cascade_attention import NEG, grouped_partial_attention, merge_partials, private_partial_attention
from .hf_engine import Engine, KVState
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
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        return "not a <Model>ForCausalLM with .model.layers and .lm_head"
    attn = inner.layers[0].self_attn
    if hasattr(attn, "q_norm") or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention layout differs from LLaMA's"
    return None


@dataclass(eq=False)
class Block:
    """KV of a run of consecutive positions that several rows share (a prompt, a segment
    that was forked): per layer ``(K, V)``, each ``[Hkv, n, D]``. ``prev`` is the block
    before it on the path, so a block also names the whole chain of blocks ending with it."""

    kv: KVState
    prev: "Block | None" = None
    _chain: torch.Tensor | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[1]

    def chain_kv(self) -> torch.Tensor:
        """K and V of every layer for the whole chain ending here, token-major
        ``[T, layers, 2, Hkv, D]`` (one tensor, so a round stacks its chains in one call);
        built once from the previous block's and kept while the block lives."""
        if self._chain is None:
            own = torch.stack([torch.stack(kv) for kv in self.kv]).permute(3, 0, 1, 2, 4)  # [n, L, 2, Hkv, D]
            self._chain = own.contiguous() if self.prev is None else torch.cat([self.prev.chain_kv(), own])
        return self._chain


@dataclass(eq=False)
class CascadeState:
    """A node's cached state (its path's KV minus the last token) = a chain of shared blocks
    (``head`` is its last block) + a private tail: row ``row`` of the per-layer buffers
    ``buffers``, ``own_len`` positions (kept by reference; views are made only if needed)."""

    head: Block | None
    buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    row: int = 0
    own_len: int = 0
    _fork: Block | None = field(default=None, repr=False)

    def fork_head(self) -> Block:
        """The chain head of this state's children when it forks: its tail as a new shared
        block (one object however many children share it)."""
        if self._fork is None:
            n, i = self.own_len, self.row
            self._fork = Block([(K[i, :, :n], V[i, :, :n]) for K, V in self.buffers], self.head)  # type: ignore[union-attr]
        return self._fork


def as_cascade_state(st) -> CascadeState:
    if isinstance(st, CascadeState):
        return st
    if st is None:  # an empty context (a one-token path)
        return CascadeState(None)
    return CascadeState(Block(st))


class _Shared:
    """The shared context of one decode call: the distinct block chains, padded into
    ``[N, Hkv, T, D]`` per layer, and the rows that read each.

    One grouped attention over whole chains, rather than one per block depth, keeps the
    number of kernel calls per step that of independent sampling (one shared prompt per
    group): on CPU, per-call overhead outweighs the bytes a per-depth split would save
    (measured: a per-depth variant was ~20% slower on the embedded model)."""

    def __init__(self, heads: list[Block | None]):
        order: dict[int, int] = {}
        uniq: list[Block] = []
        members: list[list[int]] = []
        for r, h in enumerate(heads):
            if h is None:
                continue
            n = order.get(id(h))
            if n is None:
                n = order[id(h)] = len(uniq)
                uniq.append(h)
                members.append([])
            members[n].append(r)
        chains = [h.chain_kv() for h in uniq]
        lens = [c.shape[0] for c in chains]
        N, T = len(uniq), max(lens)
        padded = torch.nn.utils.rnn.pad_sequence(chains, batch_first=True)  # [N, T, L, 2, Hkv, D]
        self.layers = [
            (padded[:, :, li, 0].transpose(1, 2).contiguous(), padded[:, :, li, 1].transpose(1, 2).contiguous())
            for li in range(padded.shape[2])
        ]
        dev = padded.device
        self.bias = torch.where(torch.arange(T)[None, :] < torch.tensor(lens)[:, None], 0.0, NEG).to(dev)
        B, S = len(heads), max(len(m) for m in members)
        # members_orig[n, s]: original row in slot s of chain n (B = empty slot);
        # slot_orig[r]: flat slot of original row r (N * S = no chain: a dummy slot).
        flat = [B] * (N * S)
        slot = [N * S] * B
        for n, rs in enumerate(members):
            for k, r in enumerate(rs):
                flat[n * S + k] = r
                slot[r] = n * S + k
        self.members_orig = torch.tensor(flat).view(N, S)
        self.slot_orig = torch.tensor(slot)
        self.members = self.inverse = None

    def index(self, alive: torch.Tensor, device) -> None:
        """Point the slots at the live rows' batch positions (dead rows -> the zero query)."""
        B, live = self.slot_orig.shape[0], alive.shape[0]
        pos = torch.full((B + 1,), live, dtype=torch.long)
        pos[alive] = torch.arange(live)
        self.members = pos[self.members_orig].to(device)
        self.inverse = self.slot_orig[alive].to(device)


class CascadeEngine(Engine):
    """:class:`Engine` with cascade-attention decoding (same API, same sampling, same RNG).

    Cached states are :class:`CascadeState` objects; a state inside a longer cached path is
    not cropped out (such nodes are prefilled instead), so SPO-chain should keep
    :class:`Engine`. Build one with :meth:`from_engine` to share an engine's generator and
    counters.
    """

    def __init__(self, model, tokenizer, *args, **kwargs):
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"CascadeEngine cannot decode this model: {why}")
        super().__init__(model, tokenizer, *args, **kwargs)
        base = _base(model)
        self._inner, self._lm_head = base.model, base.lm_head
        attn = self._inner.layers[0].self_attn
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self._heads = (base.config.num_attention_heads, base.config.num_key_value_heads, attn.head_dim)
        self._scaling = attn.scaling

    @classmethod
    def from_engine(cls, engine: Engine) -> "CascadeEngine":
        """A cascade engine that shares ``engine``'s model, sampling, generator and stats."""
        new = cls(engine.model, engine.tokenizer, engine.params, engine.max_batch_size, eos_token_ids=sorted(engine.eos_token_ids))
        new.generator, new.stats, new._stop_candidate = engine.generator, engine.stats, engine._stop_candidate
        return new

    def _lookup(self, tree, node):
        return tree.kv.get(node)  # no crops of longer states: the node is prefilled instead

    # ----- one decode call --------------------------------------------------------------
    def _decode(self, rows, limits: list[int], keep_kv: bool):
        B = len(rows)
        states: dict[int, CascadeState] = {}
        uses: dict[int, int] = {}
        for _, st, _ in rows:
            states.setdefault(id(st), as_cascade_state(st))
            uses[id(st)] = uses.get(id(st), 0) + 1
        heads: list[Block | None] = []
        tails: list[CascadeState | None] = []
        for _, st, _ in rows:
            cs = states[id(st)]
            if uses[id(st)] > 1 and cs.own_len:  # forked: the tail becomes a shared block
                heads.append(cs.fork_head())
                tails.append(None)
            else:
                heads.append(cs.head)
                tails.append(cs if cs.own_len else None)
        shared = _Shared(heads) if any(h is not None for h in heads) else None
        own, lens, zeroed = self._tail_buffers(tails, max(limits))
        slot = torch.arange(B, device=self.device)  # buffer row of each live row
        nbuf = B

        paths = [p for _, _, p in rows]
        inp = torch.tensor([p[-1] for p in paths], device=self.device)
        pos = torch.tensor([len(p) - 1 for p in paths], device=self.device)
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        kvs: list[CascadeState | None] = [None] * B
        alive = list(range(B))
        if shared is not None:
            shared.index(torch.tensor(alive), self.device)
        prm = self.params
        for _ in range(max(limits)):
            T = int(lens[slot].max()) + 1
            if T > zeroed:  # V must be finite where it is masked (0 * NaN = NaN)
                for _, V in own:
                    V[:, :, zeroed:T].zero_()
                zeroed = T
            logits = self._step(inp, pos, own, lens, slot, shared, T)
            tok, lp = sample_tokens(logits.cpu(), prm.temperature, prm.top_p, prm.top_k, self.generator)
            self.stats.forward_calls += 1
            self.stats.decode_tokens += len(alive)
            lens[slot] += 1
            tl, ll = tok.tolist(), lp.tolist()
            keep: list[int] = []
            for b, r in enumerate(alive):
                toks[r].append(tl[b])
                lps[r].append(ll[b])
                reason = self._finish_reason(tl[b], paths[r], toks[r], limits[r])
                if reason is None:
                    keep.append(b)
                    continue
                reasons[r] = reason
                if keep_kv or reason == FinishReason.SEGMENT:
                    i = int(slot[b])
                    kvs[r] = CascadeState(heads[r], own, i, int(lens[i]))
            if len(keep) < len(alive):
                if not keep:
                    break
                kt = torch.tensor(keep, device=self.device)
                alive = [alive[b] for b in keep]
                tok, pos, slot = tok.to(self.device)[kt], pos[kt], slot[kt]
                if 2 * len(alive) <= nbuf:
                    # Compact the buffers only once half their rows are dead: a copy per
                    # step that loses a row would cost more than attending over dead rows.
                    own = [(K.index_select(0, slot), V.index_select(0, slot)) for K, V in own]
                    lens, nbuf = lens[slot], len(alive)
                    slot = torch.arange(nbuf, device=self.device)
                if shared is not None:
                    shared.index(torch.tensor(alive), self.device)
            inp = tok.to(self.device)
            pos = pos + 1
        return [(toks[r], lps[r], reasons[r], kvs[r]) for r in range(B)]

    def _tail_buffers(self, tails: list[CascadeState | None], steps: int):
        """Per-layer ``[B, Hkv, cap, D]`` buffers holding each row's inherited tail, the
        tails' lengths, and how many leading positions of V are zeroed."""
        B = len(tails)
        Hq, Hkv, D = self._heads
        lens = [t.own_len if t is not None else 0 for t in tails]
        cap, n0 = max(lens) + steps, max(lens)
        ref = self._inner.layers[0].self_attn.k_proj.weight
        own = [(ref.new_empty(B, Hkv, cap, D), ref.new_empty(B, Hkv, cap, D)) for _ in self._inner.layers]
        for _, V in own:
            V[:, :, :n0].zero_()
        # Copy tails from each source buffer with one gather per layer.
        by_src: dict[int, tuple[list, list[int], list[int]]] = {}
        for r, t in enumerate(tails):
            if t is not None:
                e = by_src.setdefault(id(t.buffers), (t.buffers, [], []))
                e[1].append(t.row)
                e[2].append(r)
        for bufs, src, dst in by_src.values():
            n = max(lens[r] for r in dst)
            si, di = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
            for (K, V), (Ks, Vs) in zip(own, bufs):
                K[di, :, :n] = Ks[si, :, :n]
                V[di, :, :n] = Vs[si, :, :n]
        return own, torch.tensor(lens, device=self.device), n0

    def _step(self, inp, pos, own, lens, slot, shared: _Shared | None, T: int) -> torch.Tensor:
        """One decode step for the live rows; returns next-token logits ``[R, V]``.

        ``own[layer]`` are the private-tail buffers (``lens`` positions filled per buffer
        row), ``slot`` the buffer row of each live row, ``T`` the positions to attend."""
        Hq, Hkv, D = self._heads
        R, nbuf = inp.shape[0], lens.shape[0]
        x = self._inner.embed_tokens(inp[:, None])  # [R, 1, hidden]
        cos, sin = self._inner.rotary_emb(x, pos[:, None])
        at = lens[slot]  # where the new token goes in each live row's tail
        valid = lens.clone()  # keys at or past a buffer row's length are masked
        valid[slot] = at + 1
        compact = nbuf == R
        for li, layer in enumerate(self._inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(R, 1, Hq, D).transpose(1, 2)
            k = attn.k_proj(h).view(R, 1, Hkv, D).transpose(1, 2)
            v = attn.v_proj(h).view(R, Hkv, D)
            q, k = self._rope(q, k, cos, sin)
            q = q[:, :, 0]  # [R, Hq, D]
            K, V = own[li]
            K[slot, :, at] = k[:, :, 0]
            V[slot, :, at] = v
            qb = q if compact else q.new_zeros(nbuf, Hq, D).index_copy_(0, slot, q)
            o, m, l = private_partial_attention(qb, K[:, :, :T], V[:, :, :T], valid, self._scaling)
            parts = [(o, m, l) if compact else (o[slot], m[slot], l[slot])]
            if shared is not None:
                Ks, Vs = shared.layers[li]
                qpad = torch.cat([q, q.new_zeros(1, Hq, D)])
                o, m, l = grouped_partial_attention(qpad, Ks, Vs, shared.bias, shared.members, self._scaling)
                parts.append((o[shared.inverse], m[shared.inverse], l[shared.inverse]))
            out = merge_partials(parts).to(x.dtype).reshape(R, 1, Hq * D)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self._lm_head(self._inner.norm(x))[:, 0]
