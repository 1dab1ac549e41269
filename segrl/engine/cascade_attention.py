"""Cascade attention for decoding many rows that share prefixes (pure tensor functions).

A row's keys/values are a chain of blocks: shared blocks (a prompt, a segment that several
rows descend from) and the row's own private tail. Attention over the whole chain is split
into one *partial* attention per block, each returning ``(o, m, l)`` = (unnormalised output
``sum_j exp(s_j - m) v_j``, the running max ``m`` and the normaliser ``l = sum_j exp(s_j - m)``),
and the partials are merged exactly with the log-sum-exp rule (as in FlashAttention /
FlashInfer's cascade attention). What it buys: a shared block's keys and values are read
once per block for all the rows below it (one small matrix-matrix product), not once per
row, and nothing is ever concatenated or copied per decode step.

Shapes: ``Hq`` query heads, ``Hkv`` key/value heads (``g = Hq // Hkv``, grouped-query
attention), ``D`` head dim; one query token per row.
"""

from __future__ import annotations

import torch

# Stands in for -inf: exp(NEG - finite) is exactly 0 and (NEG - NEG) is 0, never NaN.
NEG = -1e30


def grouped_partial_attention(
    q_rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_bias: torch.Tensor,
    members: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of each block's member rows over that block only.

    Args:
        q_rows: ``[R + 1, Hq, D]`` queries; row ``R`` is a zero row used as padding.
        keys, values: ``[N, Hkv, T, D]`` the N distinct blocks of one level, padded to T.
        key_bias: ``[N, T]`` 0 for real positions, ``NEG`` for padding.
        members: ``[N, S]`` long, the rows reading each block (``R`` = padding slot).
        scaling: softmax scale (``head_dim ** -0.5``).
    Returns:
        ``(o [N*S, Hq, D], m [N*S, Hq], l [N*S, Hq])`` in slot order (row of slot ``n*S + s``
        is ``members[n, s]``).
    """
    N, Hkv, T, D = keys.shape
    S = members.shape[1]
    Hq = q_rows.shape[1]
    g = Hq // Hkv
    q = q_rows[members]  # [N, S, Hq, D]
    q = q.view(N, S, Hkv, g, D).permute(0, 2, 1, 3, 4).reshape(N, Hkv, S * g, D)
    s = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # [N, Hkv, S*g, T]
    s = s + key_bias[:, None, None, :]
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1)
    o = torch.matmul(p.to(values.dtype), values).float()  # [N, Hkv, S*g, D]
    o = o.view(N, Hkv, S, g, D).permute(0, 2, 1, 3, 4).reshape(N * S, Hq, D)
    m = m.view(N, Hkv, S, g).permute(0, 2, 1, 3).reshape(N * S, Hq)
    l = l.view(N, Hkv, S, g).permute(0, 2, 1, 3).reshape(N * S, Hq)
    return o, m, l


def private_partial_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of each row over its own keys ``keys[r, :, :lengths[r]]``.

    Args:
        q: ``[R, Hq, D]``; keys, values: ``[R, Hkv, T, D]`` (may be a view of a longer buffer);
        lengths: ``[R]`` long, every entry >= 1.
    Returns:
        ``(o [R, Hq, D], m [R, Hq], l [R, Hq])``.
    """
    R, Hkv, T, D = keys.shape
    Hq = q.shape[1]
    g = Hq // Hkv
    qg = q.view(R, Hkv, g, D)
    s = torch.matmul(qg, keys.transpose(-1, -2)).float() * scaling  # [R, Hkv, g, T]
    pad = torch.arange(T, device=q.device)[None, :] >= lengths[:, None]
    s = s.masked_fill(pad[:, None, None, :], NEG)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1)
    o = torch.matmul(p.to(values.dtype), values).float()  # [R, Hkv, g, D]
    return o.reshape(R, Hq, D), m.reshape(R, Hq), l.reshape(R, Hq)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax over the union of the partials' keys.

    Args:
        parts: ``(o [R, Hq, D], m [R, Hq], l [R, Hq])`` per block level, rows aligned; a row
            with no keys in a level has ``m = NEG``, ``l = 0``, ``o = 0`` there.
    Returns:
        ``[R, Hq, D]`` attention output (float32).
    """
    if len(parts) == 1:
        o, _, l = parts[0]
        return o / l[..., None]
    o = torch.stack([p[0] for p in parts])
    m = torch.stack([p[1] for p in parts])
    l = torch.stack([p[2] for p in parts])
    w = torch.exp(m - m.amax(0, keepdim=True))  # [P, R, Hq]
    return (w[..., None] * o).sum(0) / (w * l).sum(0)[..., None]
