"""Cascade attention for decoding many rows that share prefixes (pure tensor functions).

A row's keys/values are a shared chain (a prompt, and segments that several rows descend
from) and the row's own private tail. Attention over both is split into one *partial*
attention per part, each returning ``(o, lse)`` = (the softmax-normalised output over that
part's keys, the log-sum-exp of its scores), and the partials are merged exactly:
``out = sum_i exp(lse_i - logsumexp_j lse_j) * o_i`` (as in FlashAttention / FlashInfer's
cascade attention). What it buys: a shared chain's keys and values are read once for all
the rows below it (one small matrix-matrix product per chain), not once per row, and
nothing is concatenated or copied per decode step.

On CPU both partials run in PyTorch's fused flash-attention kernel, which returns the
log-sum-exp (~25% faster than the unfused ops at 256 rows x 60 positions); elsewhere the
same maths runs unfused.

Shapes: ``Hq`` query heads, ``Hkv`` key/value heads (``g = Hq // Hkv``, grouped-query
attention), ``D`` head dim; one query token per row. Masks are additive (0 / ``-inf``),
shaped ``[batch, 1, 1, T]``; a query whose keys are all masked gets ``o = 0`` and an
undefined ``lse`` (callers drop such rows).
"""

from __future__ import annotations

import torch

# Log-sum-exp of a partial with no keys: exp(NEG - finite) is exactly 0 in the merge.
NEG = -1e30
import os
_FUSED = os.environ.get("SEGRL_FUSED", "1") == "1"


def key_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Additive mask ``[B, 1, 1, T]``: 0 for the first ``lengths[b]`` positions, -inf after."""
    pad = torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]
    return torch.zeros(pad.shape, dtype=torch.float32, device=lengths.device).masked_fill_(pad, float("-inf"))[:, None, None, :]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [B, H, n, D]`` over ``k, v [B, H, T, D]``; returns ``(o [B, H, n, D], lse [B, H, n])``."""
    if q.device.type == "cpu" and _FUSED and q.shape[0] * q.shape[1] <= 64:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask.to(q.dtype), scale=scaling)
        return o, lse.reshape(o.shape[:-1])
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scaling).add_(mask)
    lse = torch.logsumexp(s, -1, keepdim=True)
    o = torch.matmul(s.sub_(lse).exp_().nan_to_num_(0.0).to(v.dtype), v)
    return o, lse.squeeze(-1)


def grouped_partial_attention(
    q_rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    members: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each chain's member rows over that chain only.

    Args:
        q_rows: ``[R + 1, Hq, D]`` queries; row ``R`` is a zero row used as padding.
        keys, values: ``[N, Hkv, T, D]`` the N distinct chains, padded to T.
        mask: ``[N, 1, 1, T]`` additive key mask (padding).
        members: ``[N, S]`` long, the rows reading each chain (``R`` = padding slot).
        scaling: softmax scale (``head_dim ** -0.5``).
    Returns:
        ``(o [N*S, Hq, D], lse [N*S, Hq])`` in slot order (row of slot ``n*S + s`` is
        ``members[n, s]``).
    """
    N, Hkv, T, D = keys.shape
    S = members.shape[1]
    Hq = q_rows.shape[1]
    g = Hq // Hkv
    q = q_rows[members]  # [N, S, Hq, D]
    q = q.view(N, S, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(N, Hkv, S * g, D)
    o, lse = _attend(q, keys, values, mask, scaling)
    o = o.view(N, Hkv, S, g, D).permute(0, 2, 1, 3, 4).reshape(N * S, Hq, D)
    lse = lse.view(N, Hkv, S, g).permute(0, 2, 1, 3).reshape(N * S, Hq)
    return o, lse


def private_partial_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each row over its own keys.

    Args:
        q: ``[R, Hq, D]``; keys, values: ``[R, Hkv, T, D]`` (may be a view of a longer buffer);
        mask: ``[R, 1, 1, T]`` additive key mask (a row's positions past its length).
    Returns:
        ``(o [R, Hq, D], lse [R, Hq])``.
    """
    R, Hkv, T, D = keys.shape
    Hq = q.shape[1]
    o, lse = _attend(q.view(R, Hkv, Hq // Hkv, D), keys, values, mask, scaling)
    return o.reshape(R, Hq, D), lse.reshape(R, Hq)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of the partials' keys.

    Args:
        parts: ``(o [R, Hq, D], lse [R, Hq])`` per part, rows aligned; a row with no keys in
            a part has ``lse = NEG`` there.
    Returns:
        ``[R, Hq, D]`` attention output.
    """
    if len(parts) == 1:
        return parts[0][0]
    o = torch.stack([p[0] for p in parts])
    lse = torch.stack([p[1] for p in parts]).float()
    w = torch.softmax(lse, 0)  # exp(lse_i - logsumexp_j lse_j)
    return (w[..., None].to(o.dtype) * o).sum(0)


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
