"""Cascade attention for decoding many rows that share prefixes (a pure tensor function).

A row's keys/values are the blocks it shares with other rows (a prompt; the completion
shared up to a fork) and the row's own private tail. Each shared block is stored once and its
keys are multiplied with the queries of all the rows that read it in one batched product (a
matrix-matrix product per block instead of one matrix-vector product per row: the block is
read from memory once per step, not once per row), the private tails per row; the scores of
all parts then go through ONE softmax over their union, which is exactly the attention over
the row's whole path. (FlashInfer's cascade attention merges per-part outputs by their
log-sum-exp instead; on CPU, with short parts, the extra log-sum-exp and merge passes cost
more than the concatenation.)

Shapes: ``Hq`` query heads, ``Hkv`` key/value heads (``g = Hq // Hkv``, grouped-query
attention), ``D`` head dim; one query token per row. Masks are additive (0 / ``-inf``),
shaped ``[batch, 1, 1, T]``.
"""

from __future__ import annotations

import torch


def key_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Additive mask ``[B, 1, 1, T]``: 0 for the first ``lengths[b]`` positions, -inf after."""
    pad = torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]
    return torch.zeros(pad.shape, dtype=torch.float32, device=lengths.device).masked_fill_(pad, float("-inf"))[:, None, None, :]


def level_indices(
    members: torch.Tensor, inverse: torch.Tensor, Hq: int, Hkv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flat gather indices for one level of :func:`cascade_attention`, computed once per
    batch layout (not per layer).

    Args:
        members: ``[N, S]`` the queries (rows ``0..R-1``) reading each block, ``R`` = padding.
        inverse: ``[R]`` each query's slot ``n * S + s`` in ``members``; ``N * S`` = it reads
            no block of this level.
    Returns:
        ``(qidx [N*Hkv*S*g], sidx [R*Hq], none)``: ``qidx`` picks, from the queries viewed as
        ``[R*Hq, D]``, the grouped layout ``[N, Hkv, S*g, D]`` (slot ``(n, h, s, j)`` = head
        ``h*g + j`` of query ``members[n, s]``; padding picks query 0, whose products are
        never read); ``sidx`` picks each query head's row back out of ``[N*Hkv*S*g, .]``;
        ``none`` is ``[R, 1, 1]`` True for queries reading no block, or None if all read one.
    """
    N, S = members.shape
    R = inverse.shape[0]
    g = Hq // Hkv
    dev = members.device
    # (n, h, s, j) <- query row * Hq + head h*g + j
    heads = torch.tensor([[h * g + j for j in range(g)] for h in range(Hkv)], device=dev)
    qidx = (members.masked_fill(members >= R, 0)[:, None, :, None] * Hq + heads[None, :, None, :]).reshape(-1)
    # query row r, head h*g + j <- ((n*Hkv + h)*S + s)*g + j, with n*S + s = inverse[r]
    miss = inverse >= N * S
    inv = inverse.masked_fill(miss, 0)
    off = torch.tensor([(k // g) * S * g + k % g for k in range(Hq)], device=dev)
    sidx = (((inv + (inv // S) * (S * (Hkv - 1))) * g)[:, None] + off[None, :]).reshape(-1)
    return qidx, sidx, (miss.view(R, 1, 1) if bool(miss.any()) else None)


def cascade_attention(
    q: torch.Tensor,
    private: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]],
) -> torch.Tensor:
    """Decode attention of each row over its private keys and over the shared blocks it
    reads, with ONE softmax over the union of the keys (no per-part log-sum-exp and merge).

    Args:
        q: ``[R, Hq, D]`` queries, already multiplied by the softmax scale.
        private: ``(K, V [n, Hkv, T, D], mask [n, 1, 1, T], rows)``: the private keys of
            ``n >= R`` buffer rows (a view is fine); ``rows [R]`` says which buffer row each
            query owns (None: buffer row r is query r).
        levels: per level ``(K, V [N, Hkv, Tl, D], mask [N, 1, 1, Tl], qidx, sidx, none)``,
            the last three from :func:`level_indices` (which queries read which block).
    Returns:
        ``[R, Hq, D]``.
    """
    R, Hq, D = q.shape
    K, V, mask, rows = private
    n, Hkv, T, _ = K.shape
    g = Hq // Hkv
    qb = q if rows is None else q.new_zeros(n, Hq, D).index_copy_(0, rows, q)
    s = torch.matmul(qb.view(n, Hkv, g, D), K.transpose(-1, -2)).add_(mask).view(n, Hq, T)
    scores = [s if rows is None else s[rows]]
    qf = q.reshape(R * Hq, D)
    # Per level: one gather of the queries into the blocks' grouped layout, one product per
    # block, one gather of the scores back (no per-layer transposes, pads or concatenations).
    for Kl, _, ml, qidx, sidx, none in levels:
        N, _, Tl, _ = Kl.shape
        sl = torch.matmul(qf.index_select(0, qidx).view(N, Hkv, -1, D), Kl.transpose(-1, -2)).add_(ml)
        sl = sl.view(-1, Tl).index_select(0, sidx).view(R, Hq, Tl)
        scores.append(sl if none is None else sl.masked_fill_(none, float("-inf")))
    p = torch.softmax(torch.cat(scores, -1) if levels else scores[0], -1)
    pp = p[..., :T]
    if rows is not None:
        pp = p.new_zeros(n, Hq, T).index_copy_(0, rows, pp)
    o = torch.matmul(pp.reshape(n, Hkv, g, T), V).view(n, Hq, D)
    if rows is not None:
        o = o[rows]
    pf = p.view(R * Hq, -1)
    at = T
    for _, Vl, _, qidx, sidx, none in levels:
        N, _, Tl, _ = Vl.shape
        pg = pf[:, at : at + Tl].index_select(0, qidx).view(N, Hkv, -1, Tl)
        at += Tl
        ol = torch.matmul(pg, Vl).view(-1, D).index_select(0, sidx).view(R, Hq, D)
        o.add_(ol if none is None else ol.masked_fill_(none, 0.0))
    return o
