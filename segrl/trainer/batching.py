"""Training samples -> padded micro-batches, with each distinct context encoded once.

A GRPO group's ``num_generations`` completions share their prompt, and an SPO-tree /
TreePO node's children share prompt + path. :func:`collate` keeps one row per distinct
context and an index from every response row to its context, so the trainer's forward
(:func:`segrl.algos.logprobs.shared_context_logprobs`) encodes the shared tokens once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..algos.samples import TrainSample


@dataclass
class Batch:
    """One micro-batch.

    Attributes:
        context_ids, context_mask: ``[U, C]`` distinct contexts, left-padded.
        context_index: ``[B]`` the context row of each response row.
        response_ids, response_mask: ``[B, R]`` responses, right-padded.
        old, adv, mask: ``[B, R]`` sampling log-probs, advantages, loss mask.
    """

    context_ids: torch.Tensor
    context_mask: torch.Tensor
    context_index: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor

    def full(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(ids [B, C + R], attention_mask, C)``: every row's context + response in full."""
        i = self.context_index
        ids = torch.cat([self.context_ids[i], self.response_ids], 1)
        attn = torch.cat([self.context_mask[i], self.response_mask], 1)
        return ids, attn, self.context_ids.shape[1]

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def sort_for_sharing(samples: Sequence[TrainSample]) -> list[TrainSample]:
    """Samples ordered so that rows sharing a context are adjacent (they land in the same
    micro-batch), groups ordered by length (less padding per micro-batch)."""
    groups: dict[tuple[int, ...], list[TrainSample]] = {}
    for s in samples:
        groups.setdefault(tuple(s.context), []).append(s)
    for g in groups.values():
        g.sort(key=lambda s: len(s.response))
    order = sorted(groups.values(), key=lambda g: (len(g[0].context) + max(len(s.response) for s in g), len(g[0].context)))
    return [s for g in order for s in g]


def micro_batches(samples: Sequence[TrainSample], max_seqs: int, max_tokens: int = 0) -> list[list[TrainSample]]:
    """Consecutive runs of ``samples`` (sort them first) with at most ``max_seqs`` rows and,
    when ``max_tokens > 0``, at most ``max_tokens`` padded tokens (rows x (longest context +
    longest response): an upper bound of what :func:`collate` allocates). A sample longer
    than ``max_tokens`` on its own is a micro-batch by itself."""
    out: list[list[TrainSample]] = []
    cur: list[TrainSample] = []
    c_max = r_max = 0
    for s in samples:
        c, r = max(c_max, len(s.context)), max(r_max, len(s.response))
        if cur and (len(cur) >= max_seqs or (max_tokens > 0 and (len(cur) + 1) * (c + r) > max_tokens)):
            out.append(cur)
            cur, c, r = [], len(s.context), len(s.response)
        cur.append(s)
        c_max, r_max = c, r
    if cur:
        out.append(cur)
    return out


def collate(batch: Sequence[TrainSample], pad_id: int, share_contexts: bool = True) -> Batch:
    """Pad ``batch`` into a :class:`Batch`; with ``share_contexts`` identical contexts get one
    row (otherwise one context row per sample)."""
    keys: dict[tuple[int, ...], int] = {}
    index: list[int] = []
    contexts: list[list[int]] = []
    for s in batch:
        key = tuple(s.context) if share_contexts else (len(contexts),)
        if key not in keys:
            keys[key] = len(contexts)
            contexts.append(list(s.context))
        index.append(keys[key])
    C = max(len(c) for c in contexts)
    R = max(len(s.response) for s in batch)
    U, B = len(contexts), len(batch)
    ctx = torch.full((U, C), pad_id, dtype=torch.long)
    cmask = torch.zeros(U, C, dtype=torch.long)
    for u, c in enumerate(contexts):
        ctx[u, C - len(c) :] = torch.tensor(c)
        cmask[u, C - len(c) :] = 1
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    rmask = torch.zeros(B, R, dtype=torch.long)
    old, adv, mask = torch.zeros(B, R), torch.zeros(B, R), torch.zeros(B, R)
    for b, s in enumerate(batch):
        r = len(s.response)
        resp[b, :r] = torch.tensor(s.response)
        rmask[b, :r] = 1
        old[b, :r] = torch.tensor(s.old_logprobs)
        adv[b, :r] = torch.tensor(s.advantages)
        mask[b, :r] = torch.tensor(s.mask, dtype=torch.float)
    return Batch(ctx, cmask, torch.tensor(index), resp, rmask, old, adv, mask)
