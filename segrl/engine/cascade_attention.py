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


def cascade_attention(
    q: torch.Tensor,
    private: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]],
) -> torch.Tensor:
    """Decode attention of each row over its private keys and over the shared blocks it
    reads, with ONE softmax over the union of the keys (no per-part log-sum-exp and merge).

    Args:
        q: ``[R, Hq, D]`` queries, already multiplied by the softmax scale.
        private: ``(K, V [n, Hkv, T, D], mask [n, 1, 1, T], rows)``: the private keys of
            ``n >= R`` buffer rows (a view is fine); ``rows [R]`` says which buffer row each
            query owns (None: buffer row r is query r).
        levels: per level ``(K, V [N, Hkv, Tl, D], mask [N, 1, 1, Tl], members [N, S],
            inverse [R], partial)``: ``members`` are the queries reading each block (``R`` =
            padding), ``inverse`` each query's flat slot in ``members`` (``N*S`` = reads no
            block of this level; only if ``partial``).
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
    qpad = torch.cat([q, q.new_zeros(1, Hq, D)]) if levels else None
    for Kl, _, ml, members, inverse, partial in levels:
        N, S = members.shape
        Tl = Kl.shape[2]
        qg = qpad[members].view(N, S, Hkv, g, D).transpose(1, 2).reshape(N, Hkv, S * g, D)
        sl = torch.matmul(qg, Kl.transpose(-1, -2)).add_(ml)
        sl = sl.view(N, Hkv, S, g, Tl).transpose(1, 2).reshape(N * S, Hq, Tl)
        if partial:
            sl = torch.cat([sl, sl.new_full((1, Hq, Tl), float("-inf"))])
        scores.append(sl[inverse])
    p = torch.softmax(torch.cat(scores, -1) if levels else scores[0], -1)
    pp = p[..., :T]
    if rows is not None:
        pp = p.new_zeros(n, Hq, T).index_copy_(0, rows, pp)
    o = torch.matmul(pp.reshape(n, Hkv, g, T), V).view(n, Hq, D)
    if rows is not None:
        o = o[rows]
    at = T
    for _, Vl, _, members, inverse, partial in levels:
        N, S = members.shape
        Tl = Vl.shape[2]
        pl = torch.cat([p[..., at : at + Tl], p.new_zeros(1, Hq, Tl)])
        at += Tl
        pg = pl[members].view(N, S, Hkv, g, Tl).transpose(1, 2).reshape(N, Hkv, S * g, Tl)
        ol = torch.matmul(pg, Vl).view(N, Hkv, S, g, D).transpose(1, 2).reshape(N * S, Hq, D)
        if partial:
            ol = torch.cat([ol, ol.new_zeros(1, Hq, D)])
        o = o + ol[inverse]
    return o
