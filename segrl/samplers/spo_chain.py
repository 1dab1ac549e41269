"""SPO-chain sampling: trajectories, segment boundaries, and Monte-Carlo value estimates.

Paper: Guo et al., *Segment Policy Optimization*, arXiv 2505.23564, Sec. 4 (SPO-chain).

For each prompt (one :class:`~segrl.tree.RolloutTree`):

1. sample ``N`` trajectories in one :meth:`Engine.extend` call with ``keep_kv=True``, so each
   finished trajectory keeps the KV cache of its whole path;
2. cut each trajectory at its boundaries (a :mod:`~segrl.samplers.partition` strategy, then
   the ``max_segments`` cap). :meth:`RolloutTree.split` turns the trajectory into a chain
   ``head_1 -> ... -> tail``: boundary ``b_j`` is the end of node ``head_j`` (the prompt
   root for ``b = 0``) and the trajectory's KV moves to its last node;
3. boundary states shared by several trajectories of a prompt (same token prefix, e.g. the
   prompt itself, or a common first line) are estimated once: ``K`` MC continuations hang
   off one representative head node (``info["mc"] = True``). All continuations of the batch
   come from one more ``extend`` call, in which every head's state is a *crop* of the KV
   its trajectory already holds (``engine.stats.kv_crops``): no prefix is prefilled twice;
4. the scorer grades trajectories and continuations together; ``V(s_b)`` = mean reward of
   the ``K`` continuations.

Per trajectory leaf, ``info["spo_bounds"]`` holds the boundary offsets (within the
completion) and ``info["spo_nodes"]`` the representative boundary nodes whose MC children
give the values. :func:`chain_values` reads them back (it also works on hand-built trees).
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..engine.base import RolloutEngine, release
from ..tree import FinishReason, RolloutTree
from .partition import Partition, cap_boundaries

Scorer = Callable[[Sequence[tuple[RolloutTree, int]]], dict]


class SPOChainSampler:
    """Grows SPO-chain rollouts (see the module docstring).

    Args:
        partition: the segment partition strategy.
        num_generations: ``N`` trajectories per prompt.
        num_mc_samples: ``K`` continuations per distinct boundary state.
        max_completion_length: token limit of a trajectory (continuations included).
        max_segments, cap_rule: the boundary cap (:func:`cap_boundaries`).
    """

    def __init__(
        self,
        partition: Partition,
        num_generations: int,
        num_mc_samples: int,
        max_completion_length: int,
        max_segments: int = 0,
        cap_rule: str = "even",
    ):
        self.partition = partition
        self.n = num_generations
        self.k = num_mc_samples
        self.max_len = max_completion_length
        self.max_segments = max_segments
        self.cap_rule = cap_rule

    # ----- the three phases ----------------------------------------------------------
    def sample_trajectories(self, engine: RolloutEngine, trees: Sequence[RolloutTree]) -> None:
        """``N`` trajectories per root, keeping their KV for the MC continuations."""
        engine.extend([(t, 0) for t in trees], self.max_len, self.n, keep_kv=True)
        for t in trees:
            for leaf in t.leaves(include_mc=False):
                if t[leaf].finish_reason == FinishReason.SEGMENT:
                    t[leaf].finish_reason = FinishReason.LENGTH

    def boundaries(self, tokens: Sequence[int], logprobs: Sequence[float]) -> tuple[list[int], int]:
        """Capped boundaries of one trajectory, and the uncapped candidate count."""
        cand = self.partition(tokens, logprobs)
        return cap_boundaries(cand, self.max_segments, self.cap_rule, logprobs), len(cand)

    def split(self, trees: Sequence[RolloutTree]) -> list[tuple[RolloutTree, int]]:
        """Cut every trajectory at its boundaries; return the distinct boundary nodes that
        need MC estimates (one per distinct prefix per tree), in a stable order."""
        requests: list[tuple[RolloutTree, int]] = []
        for t in trees:
            reps: dict[tuple[int, ...], int] = {}
            for leaf in t.leaves(include_mc=False):
                if "spo_bounds" in t[leaf].info:
                    continue  # already split
                toks = t.path_token_ids(leaf, include_prompt=False)
                lps = t.path_logprobs(leaf)
                bounds, n_cand = self.boundaries(toks, lps)
                nodes, node, start = [], leaf, 0
                for b in bounds:
                    if b == 0:
                        head = 0  # the prompt state: the root, shared by the whole tree
                    else:
                        tail = t.split(node, b - start)
                        head, node, start = node, tail, b
                    key = tuple(toks[:b])
                    if key not in reps:
                        reps[key] = head
                        requests.append((t, head))
                    elif head != reps[key]:
                        t[head].info["mc_from"] = reps[key]
                    nodes.append(reps[key])
                t[node].info.update(spo_bounds=list(bounds), spo_nodes=nodes, spo_candidates=n_cand)
        return requests

    def continue_mc(self, engine: RolloutEngine, requests: Sequence[tuple[RolloutTree, int]]) -> list[tuple[RolloutTree, int]]:
        """``K`` continuations from every boundary node in one engine call (crops of the
        trajectories' KV); returns the MC leaves."""
        if not requests:
            return []
        limits = [self.max_len - t.completion_len(h) for t, h in requests]
        kids = engine.extend(list(requests), limits, self.k, mc=True)
        out = []
        for group in kids:
            for t, c in group:
                if t[c].finish_reason == FinishReason.SEGMENT:
                    t[c].finish_reason = FinishReason.LENGTH
                out.append((t, c))
        return out

    def sample(self, engine: RolloutEngine, trees: Sequence[RolloutTree], scorer: Scorer) -> dict[str, float]:
        """All phases, scoring, values; returns SPO-chain metrics."""
        decoded0 = engine.stats.decode_tokens
        self.sample_trajectories(engine, trees)
        traj_tokens = engine.stats.decode_tokens - decoded0
        requests = self.split(trees)
        mc_leaves = self.continue_mc(engine, requests)
        release(trees)
        trajs = [(t, leaf) for t in trees for leaf in t.leaves(include_mc=False)]
        metrics = dict(scorer(trajs + mc_leaves))
        chain_values(trees)
        counts = [len(t[l].info["spo_bounds"]) for t, l in trajs]
        seg_lens = [e - s for t, l in trajs for s, e in _segments(t[l].info["spo_bounds"], t.completion_len(l))]
        n_bounds = sum(counts)
        mc_tokens = sum(len(t[c].token_ids) for t, c in mc_leaves)
        metrics.update(
            {
                "segments/mean_count": n_bounds / max(len(trajs), 1),
                "segments/mean_length": sum(seg_lens) / max(len(seg_lens), 1),
                "segments/candidates": sum(t[l].info["spo_candidates"] for t, l in trajs) / max(len(trajs), 1),
                "segments/no_boundary_fraction": sum(c == 0 for c in counts) / max(len(trajs), 1),
                "mc/states": float(len(requests)),
                "mc/shared_states": float(n_bounds - len(requests)),
                "mc/rollouts": float(len(mc_leaves)),
                "mc/tokens": float(mc_tokens),
                "mc/tokens_per_trajectory": mc_tokens / max(len(trajs), 1),
                "mc/trajectory_tokens": float(traj_tokens),
            }
        )
        return metrics


def _segments(bounds: Sequence[int], length: int) -> list[tuple[int, int]]:
    return list(zip(bounds, list(bounds[1:]) + [length]))


def mc_value(tree: RolloutTree, node: int) -> float:
    """Mean reward of the MC continuations hanging off ``node``."""
    rs = [tree[c].reward for c in tree[node].children if tree[c].info.get("mc")]
    if not rs or any(r is None for r in rs):
        raise ValueError(f"boundary node {node} has no scored MC continuations")
    return float(sum(rs)) / len(rs)


def chain_values(trees: Sequence[RolloutTree]) -> None:
    """Set ``node.value`` on every boundary node (representatives and the trajectories'
    own copies) from its MC continuations, and ``info["spo_values"]`` on each trajectory."""
    for t in trees:
        cache: dict[int, float] = {}
        for leaf in t.leaves(include_mc=False):
            info = t[leaf].info
            if "spo_bounds" not in info:
                continue
            vals = []
            for rep in info["spo_nodes"]:
                if rep not in cache:
                    cache[rep] = mc_value(t, rep)
                    t[rep].value = cache[rep]
                vals.append(cache[rep])
            info["spo_values"] = vals
            t[leaf].value = t[leaf].reward
        for i, n in enumerate(t.nodes):  # duplicates of a shared boundary state
            if "mc_from" in n.info:
                n.value = cache.get(n.info["mc_from"])
