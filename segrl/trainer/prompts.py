"""The training prompt stream: prompts as fresh root trees, in a seeded order that a resumed
run repeats exactly.

Each epoch is a permutation of the training rows (seeded by ``train.seed`` and the epoch;
rows marked bad are left out). Under torchrun every rank draws ``n`` prompts from disjoint
slices of the same order, and group ids are unique across ranks within a step. The
algorithm gets the stream at construction and pulls more trees from it when dynamic
sampling tops a batch up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tree import RolloutTree


class PromptStream:
    """Root trees for the next prompts of a seeded, resumable permutation.

    Args:
        prompt_ids: the tokenised training prompts.
        rows: the dataset rows (same order), passed on with each tree.
        seed: ``train.seed``.
        skip: row indices never drawn (bad rows).
        rank, world_size: this process's place under torchrun.
    """

    def __init__(
        self,
        prompt_ids: Sequence[list[int]],
        rows: Sequence[dict],
        seed: int,
        skip: set[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.prompt_ids, self.rows, self.seed = prompt_ids, rows, seed
        self.skip = set(skip or ())
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.cursor = 0
        self.order = self._permutation(0)
        self._groups = 0  # group ids handed out in this step

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return [i for i in torch.randperm(len(self.prompt_ids), generator=g).tolist() if i not in self.skip]

    def _next_rows(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor >= len(self.order):
                self.epoch += 1
                self.cursor = 0
                self.order = self._permutation(self.epoch)
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def new_step(self) -> None:
        """Start a step: group ids count from 0 again."""
        self._groups = 0

    def next_trees(self, n: int) -> list[RolloutTree]:
        """Fresh root trees for this rank's next ``n`` prompts (group ids unique in the step)."""
        W = self.world_size  # n prompts per rank, disjoint slices of one order
        idx = self._next_rows(n * W)[self.rank :: W]
        g0, self._groups = self._groups, self._groups + n
        return [RolloutTree(self.prompt_ids[i], group=(g0 + g) * W + self.rank, row=self.rows[i]) for g, i in enumerate(idx)]

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands (a checkpoint's ``epoch`` and ``cursor``)."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = self._permutation(self.epoch)
