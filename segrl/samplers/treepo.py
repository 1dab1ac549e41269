"""TreePO segment-tree sampler (Li et al., arXiv 2508.17445, Sec. 3 and Algorithm 1).

Every prompt grows a tree of fixed-length segments. A *round* is ONE batched
:meth:`Engine.extend` call over every pending path of every prompt; each path continues from
its cached KV (a segment is a tree node, so a shared prefix is decoded once and its KV forked),
and a node with no cached state (a fallback cut point) is prefilled from its own path, i.e. the
context is rebuilt from the kept prefix.

Per round, for each prompt (``w`` = width, ``d`` = divergence)::

    classify each new segment by early_stop_order (first rule that fires):
        answer (+EOS) | eos | length | depth | repetition  -> a finished leaf, else active
    if the prompt has active paths:                             # branching + budget transfer
        budget = min(w - finished, d * finished_this_round + d * active), at least active
        split budget over active paths (>= 1 each; even, or softmax of log-prob scores,
        largest remainder)
    elif finished < w:                                          # depth-first fallback
        pick finished leaves by policy, cut each at a segment boundary, regrow
        ``fallback_copies`` paths from each cut until w is used up

Invariant: in-flight + finished paths never exceed ``w``; in the default ``leaves`` budget
mode every prompt ends with exactly ``w`` leaves. See ``docs/treepo.md`` for the defects of
the released sampler that this one fixes (stale fallback context, window -1 crash, random
initial width not reachable, answer split across segments, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..engine.base import RolloutEngine, gc_paused, release
from ..tree import FinishReason, NodeInfo, RolloutTree
from .treepo_rules import (  # noqa: F401  (re-exported: the sampler's public helpers)
    _MAX_TOKEN_CHARS,
    ALL_REASONS,
    FINISH_PRIORITY,
    _randint,
    _text_decoder,
    allocate_branches,
    branch_budget,
    has_repetition,
    tree_metrics,
)


@dataclass
class _Prompt:
    """Sampling state of one prompt's tree."""

    tree: RolloutTree
    width: int
    pending: dict[int, int]  # node -> children to grow in the next round (the in-flight paths)
    finished: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    new_finished: int = 0
    fallback_nodes: set[int] = field(default_factory=set)
    fallback_points: int = 0
    fallback_rounds: int = 0
    initial_width: int = 0

    def in_flight(self) -> int:
        return sum(self.pending.values())


class TreePOSampler:
    """Grows TreePO segment trees (see module docstring).

    Args:
        cfg: the whole :class:`~segrl.configs.SegrlConfig` (``treepo``, ``sampling``, ``train``),
            validated by the config (:func:`segrl.configs.checks.validate`).
        width: leaves per prompt (default ``treepo.width`` or ``train.num_generations``).
        divergence: override ``treepo.divergence`` (tree-sampled evaluation).
        budget_mode: override ``treepo.budget_mode``.
    """

    def __init__(self, cfg, width: int | None = None, divergence: int | None = None, budget_mode: str | None = None):
        tp = cfg.treepo
        self.cfg = cfg
        self.tp = tp
        self.width = int(width or tp.width or cfg.train.num_generations)
        self.max_len = int(cfg.sampling.max_completion_length)
        self.divergence = int(divergence or tp.divergence)
        self.divergence_max = None if divergence is not None else tp.divergence_max
        self.budget_mode = budget_mode or tp.budget_mode
        self.initial_width = tp.initial_width
        self.initial_width_max = tp.initial_width_max
        self.order = list(tp.early_stop_order)
        self.answer_re = re.compile(tp.answer_pattern)
        #: per round: list of (in_flight, finished) per prompt, after the round's decisions
        self.trace: list[list[tuple[int, int]]] = []

    @classmethod
    def for_eval(cls, cfg, k: int) -> TreePOSampler:
        """The evaluation sampler: exactly ``k`` leaves per tree (width ``k``, budget mode
        ``leaves``, divergence ``treepo.eval_divergence``, initial widths capped at ``k``)."""
        import copy

        cfg = copy.deepcopy(cfg)
        cfg.treepo.initial_width = min(cfg.treepo.initial_width, k)
        if cfg.treepo.initial_width_max is not None:
            cfg.treepo.initial_width_max = min(cfg.treepo.initial_width_max, k)
        return cls(cfg, width=k, divergence=cfg.treepo.eval_divergence, budget_mode="leaves")

    # ----- public API ----------------------------------------------------------------------
    def sample(self, engine: RolloutEngine, trees: Sequence[RolloutTree], progress: float | None = None) -> dict[str, float]:
        """Grow ``trees`` (no scoring); ``progress`` is the fraction of training done (the
        divergence-temperature schedule), None outside training. Returns ``tree/*`` metrics."""
        return self.grow(engine, trees, progress)

    def __call__(self, engine: RolloutEngine, trees: Sequence[RolloutTree]) -> None:
        self.grow(engine, trees)

    @gc_paused()  # between rounds too: the trees' nodes and token lists form no cycles
    def grow(self, engine: RolloutEngine, trees: Sequence[RolloutTree], progress: float | None = None) -> dict[str, float]:
        """Sample the trees (no scoring). Returns ``tree/*`` metrics; frees all cached KV."""
        g = engine.generator
        temperature = self._temperature(progress)
        self._tok = engine.tokenizer
        states: list[_Prompt] = []
        for t in trees:
            k0 = self.initial_width
            if self.initial_width_max is not None and self.initial_width_max > k0:
                k0 = _randint(k0, self.initial_width_max, g)
            k0 = min(k0, self.width)
            states.append(_Prompt(t, self.width, {0: k0}, initial_width=k0))
        decoded0, prefill0 = engine.stats.decode_tokens, engine.stats.prefill_tokens
        self.trace = []
        cap = self.tp.max_rows_in_flight
        max_rounds = self.tp.max_rounds or (self.tp.max_depth * (self.width + 1) + 1) * (len(states) if cap else 1)
        rounds, admitted = 0, 0
        try:
            while True:
                if cap is None:
                    served = [s for s in states if s.pending]
                else:
                    served, admitted = self._admit(states, admitted, cap)
                if not served:
                    break
                if rounds >= max_rounds:
                    self._abort(states)
                    break
                rounds += 1
                self._round(engine, served, temperature, g)
                self.trace.append([(s.in_flight(), len(s.finished)) for s in states])
        finally:
            release(trees)
        for s in states:
            s.tree[0].info[NodeInfo.TREEPO] = {
                "width": s.width,
                "initial_width": s.initial_width,
                "fallback_points": s.fallback_points,
                "fallback_rounds": s.fallback_rounds,
            }
        m = tree_metrics(trees)
        m["tree/rounds"] = float(rounds)
        m["tree/engine_decoded_tokens"] = float(engine.stats.decode_tokens - decoded0)
        m["tree/prefill_tokens"] = float(engine.stats.prefill_tokens - prefill0)
        if self.tp.divergence_policy != "fixed":
            m["tree/divergence_temperature"] = temperature
        return m

    @staticmethod
    def _admit(states: list[_Prompt], admitted: int, cap: int) -> tuple[list[_Prompt], int]:
        """Prompts served this round under a row capacity: those already started, oldest
        first, while their pending paths fit; then new prompts in order. Returns
        ``(served, number of prompts admitted so far)``."""
        served, rows = [], 0
        for s in states[:admitted]:
            need = s.in_flight()
            if need and rows + need <= cap:
                served.append(s)
                rows += need
        while admitted < len(states) and rows + states[admitted].in_flight() <= cap:
            served.append(states[admitted])
            rows += states[admitted].in_flight()
            admitted += 1
        return served, admitted

    # ----- one round ---------------------------------------------------------------------
    def _round(self, engine: RolloutEngine, states: list[_Prompt], temperature: float, g: torch.Generator) -> None:
        tp = self.tp
        refs, lims, kids, meta = [], [], [], []
        for s in states:
            to_end = self._saturated(s)
            for node, k in s.pending.items():
                room = self.max_len - s.tree.completion_len(node)
                if to_end:  # the rest of the path in this call (cut into segments below)
                    room = min(room, (tp.max_depth - s.tree[node].depth) * tp.segment_length)
                refs.append((s.tree, node))
                lims.append(max(1, room if to_end else min(tp.segment_length, room)))
                kids.append(k)
                meta.append((s, node in s.fallback_nodes, to_end))
        # Paths that end this round keep their cached state until the fallback below has cut
        # from them (a cut point's state is then a crop of it, not a new prefill), unless no
        # fallback can follow (every served prompt saturated, or fallback off).
        crop = tp.fallback and not all(to_end for _, _, to_end in meta)
        out = engine.extend(refs, lims, kids, keep_kv=crop) if refs else []  # ONE batched call per round
        for s in states:
            s.pending, s.active, s.new_finished, s.fallback_nodes = {}, [], 0, set()
        for (s, from_fallback, to_end), children in zip(meta, out):
            for tree, c in children:
                if from_fallback:
                    tree[c].info[NodeInfo.FALLBACK] = True
                if to_end:
                    c = self._cut_into_segments(tree, c)
                reason = self._classify(tree, c)
                if reason is None:
                    s.active.append(c)
                else:
                    tree[c].finish_reason = reason
                    s.finished.append(c)
                    s.new_finished += 1
        for s in states:
            w = self._width(s)
            if s.active:
                div = self.divergence
                if self.divergence_max is not None and self.divergence_max > div:
                    div = _randint(div, self.divergence_max, g)
                budget = branch_budget(w, len(s.finished), s.new_finished, len(s.active), div)
                alloc = allocate_branches(budget, self._weights(s.tree, s.active, temperature), g)
                s.pending = dict(zip(s.active, alloc))
            elif tp.fallback and len(s.finished) < w:
                self._fallback(s, w, g, engine if crop else None)
        for s in states:  # (s.finished, not the indices above: a cut may have split a leaf)
            for c in s.finished:
                s.tree.kv.pop(c, None)

    def _saturated(self, s: _Prompt) -> bool:
        """True when no branching or fallback can happen any more for this prompt.

        With a fixed width, once in-flight + finished = width every later branch budget is
        ``min(width - finished, ...) = active`` (one child each), and the in-flight paths end
        as exactly the missing leaves, so the fallback never triggers either.
        """
        return (
            self.tp.saturated_fast_path
            and self.tp.max_rows_in_flight is None  # capacity freed per segment is reused
            and self.budget_mode == "leaves"
            and s.in_flight() + len(s.finished) == s.width
        )

    def _cut_into_segments(self, tree: RolloutTree, c: int) -> int:
        """Turn node ``c`` (a whole rest-of-path decoded in one call) into a chain of
        segment_length nodes, applying the early-stop rules that can fire on a segment that is
        not the last one (answer under answer_as_eos, repetition) in early_stop_order: the
        path is cut after the first segment where one fires. Returns the last segment node
        (the caller classifies it like any new segment)."""
        L = self.tp.segment_length
        n = len(tree[c].token_ids)
        if n <= L:
            return c
        # Repetition needs repetition_count copies of a repetition_substring-character string:
        # only checked where a segment can decode to that many characters.
        rep = L * self._max_token_chars() >= self.tp.repetition_substring * self.tp.repetition_count
        mid_rules = [r for r in self.order if (r == "repetition" and rep) or (r == "answer" and self.tp.answer_policy == "answer_as_eos")]
        stop_at, reason = None, None
        if mid_rules:
            before = tree.path_token_ids(tree[c].parent, include_prompt=False) if "answer" in mid_rules else []
            ids = tree[c].token_ids
            for end in range(L, n, L):  # ends of the non-final segments
                for rule in mid_rules:
                    if rule == "answer" and self.answer_re.search(self._decode(before + ids[:end])):
                        reason = FinishReason.ANSWER
                    elif rule == "repetition" and has_repetition(
                        self._decode(ids[end - L : end]), self.tp.repetition_substring, self.tp.repetition_count
                    ):
                        reason = FinishReason.REPETITION
                    if reason is not None:
                        break
                if reason is not None:
                    stop_at = end
                    break
        node = tree[c]
        if stop_at is not None:  # the tokens after the stopping segment are discarded
            node.token_ids = node.token_ids[:stop_at]
            node.logprobs = node.logprobs[:stop_at]
            tree.kv.pop(c, None)
            n = stop_at
        first = len(tree)
        last = tree.split_every(c, L)
        for i in range(first, last + 1):
            tree[i].info.pop(NodeInfo.FALLBACK, None)  # only the first segment is regrown from a cut
        if stop_at is not None:
            tree[last].finish_reason = reason
            tree[last].info[NodeInfo.STOPPED_MID] = True
        return last

    def _abort(self, states: list[_Prompt]) -> None:
        """Safety cap reached (should not happen): close open paths as depth-truncated."""
        for s in states:
            for node in list(s.pending):
                if s.tree[node].is_leaf and node != 0:
                    s.tree[node].finish_reason = FinishReason.DEPTH
                    s.finished.append(node)
            s.pending = {}

    # ----- early stop -----------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if getattr(self, "_dec_for", None) is not self._tok:
            self._dec, self._dec_for = _text_decoder(self._tok), self._tok
        return self._dec(ids)

    def _classify(self, tree: RolloutTree, c: int) -> str | None:
        """The finish reason of new segment ``c`` (first rule of early_stop_order that fires),
        or None if the path stays active."""
        node = tree[c]
        if node.info.pop(NodeInfo.STOPPED_MID, False):  # decided by _cut_into_segments
            return node.finish_reason
        ended = node.finish_reason in (FinishReason.EOS, FinishReason.STOP)
        for rule in self.order:
            if rule == "answer":
                if (ended or self.tp.answer_policy == "answer_as_eos") and self.answer_re.search(
                    self._decode(tree.path_token_ids(c, include_prompt=False))
                ):
                    return FinishReason.ANSWER
            elif rule == "eos":
                if ended:
                    return node.finish_reason
            elif rule == "length":
                if tree.completion_len(c) >= self.max_len:
                    return FinishReason.LENGTH
            elif rule == "depth":
                if node.depth >= self.tp.max_depth:
                    return FinishReason.DEPTH
            elif rule == "repetition":
                # Decode only a segment that can be long enough to hold the repeats.
                sub, count = self.tp.repetition_substring, self.tp.repetition_count
                long_enough = len(node.token_ids) * self._max_token_chars() >= sub * count
                if long_enough and has_repetition(self._decode(node.token_ids), sub, count):
                    return FinishReason.REPETITION
        return None

    def _max_token_chars(self) -> int:
        """An upper bound on the characters one token decodes to (the longest vocabulary
        entry: byte-level and sentencepiece pieces spell each byte with one character)."""
        n = _MAX_TOKEN_CHARS.get(id(self._tok))
        if n is None:
            try:
                n = max(len(t) for t in self._tok.get_vocab())
            except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary: always decode
                n = 1 << 30
            _MAX_TOKEN_CHARS[id(self._tok)] = n
        return n

    # ----- branching -------------------------------------------------------------------------
    def _width(self, s: _Prompt) -> int:
        """Leaves this prompt may end with (token-budget mode re-estimates it every round)."""
        if self.budget_mode == "leaves" or not s.finished:
            return s.width
        avg = sum(s.tree.completion_len(l) for l in s.finished) / len(s.finished)
        est = int(self.tp.token_budget // max(avg, 1.0))
        return max(self.tp.min_width, min(s.width, est))

    def _weights(self, tree: RolloutTree, active: list[int], temperature: float) -> list[float]:
        pol = self.tp.divergence_policy
        if pol == "fixed":
            return [1.0] * len(active)
        scores = []
        for c in active:
            lps = tree[c].logprobs if self.tp.divergence_score == "segment_mean" else tree.path_logprobs(c)
            if self.tp.divergence_score == "path_sum":
                scores.append(float(sum(lps)))
            else:
                scores.append(float(sum(lps) / max(len(lps), 1)))
        x = torch.tensor(scores, dtype=torch.float64) / temperature
        if pol == "low_prob":
            x = -x
        return torch.softmax(x, 0).tolist()

    def _temperature(self, progress: float | None) -> float:
        t0, t1 = self.tp.divergence_temperature, self.tp.divergence_temperature_end
        if t1 is None or progress is None:
            return t0
        p = min(max(progress, 0.0), 1.0)
        return t1 + (t0 - t1) * 0.5 * (1 + math.cos(math.pi * p))

    # ----- depth-first fallback -------------------------------------------------------------
    def _fallback(self, s: _Prompt, width: int, g: torch.Generator, engine: RolloutEngine | None = None) -> None:
        """Regrow ``width - finished`` paths from cut points of finished leaves. With
        ``engine``, a cut point's state is cropped from its leaf's cached state where the
        engine can (the KV of the kept prefix is exactly that of a forward pass over it);
        other cut points are prefilled from their kept prefix when extended."""
        need = width - len(s.finished)
        cands = self._candidates(s, g)
        copies = self.tp.fallback_copies or self.divergence
        points: dict[int, int] = {}
        i = 0
        while need > 0:
            if not cands:  # nothing eligible: fresh paths from the bare prompt
                points[0] = points.get(0, 0) + need
                break
            j = i % len(cands)
            i += 1
            cut = self._cut(s, cands, j, points, g)
            if engine is not None and cut not in s.tree.kv:
                engine.cache_prefix(s.tree, cut, cands[j])  # type: ignore[attr-defined]
            n = min(copies, need)
            points[cut] = points.get(cut, 0) + n
            need -= n
        s.pending = points
        s.fallback_nodes = set(points)
        s.fallback_points += len(points)
        s.fallback_rounds += 1

    def _candidates(self, s: _Prompt, g: torch.Generator) -> list[int]:
        tree, pol = s.tree, self.tp.fallback_trajectory_policy
        leaves = list(s.finished)
        if pol == "answer_eos":
            leaves = [l for l in leaves if tree[l].finish_reason in FinishReason.COMPLETED]
        if not leaves:
            return []
        perm = torch.randperm(len(leaves), generator=g).tolist()
        leaves = [leaves[p] for p in perm]
        if pol == "longer_first":
            leaves.sort(key=lambda l: -tree.completion_len(l))  # stable: ties stay shuffled
        elif pol == "finished_first":
            u = torch.rand(len(leaves), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            gumbel = (-torch.log(-torch.log(u))).tolist()
            key = {l: FINISH_PRIORITY.get(tree[l].finish_reason, 0) + gb for l, gb in zip(leaves, gumbel)}
            leaves.sort(key=lambda l: -key[l])
        return leaves

    def _cut(self, s: _Prompt, cands: list[int], j: int, points: dict[int, int], g: torch.Generator) -> int:
        """Cut leaf ``cands[j]`` back to a block boundary; return the node to regrow from.

        A cut inside a segment (a window that is not a multiple of the segment length) splits
        that node so the cut point is a node; indices are remapped in ``s.finished``,
        ``cands`` and ``points``.
        """
        tree, leaf = s.tree, cands[j]
        L = tree.completion_len(leaf)
        w = self.tp.window
        starts = list(range(0, L, w))
        if self.tp.fallback_max_rewind is not None:
            starts = [b for b in starts if b >= L - self.tp.fallback_max_rewind] or [starts[-1]]
        pol = self.tp.fallback_cut_policy
        if pol == "from_start":
            keep = 0
        elif pol == "random":
            keep = starts[_randint(0, len(starts) - 1, g)]
        else:  # lowest_prob
            lps = tree.path_logprobs(leaf)
            means = [sum(lps[b : b + w]) / len(lps[b : b + w]) for b in starts]
            keep = starts[min(range(len(starts)), key=lambda i: means[i])]
        if keep == 0:
            return 0
        for node, a, b in tree.segment_spans(leaf):
            if b == keep:
                return node
            if a < keep < b:
                t = tree.split(node, keep - a)
                s.finished = [t if x == node else x for x in s.finished]
                cands[:] = [t if x == node else x for x in cands]
                if node in points:  # a cut point at the old end of `node` is now `t`
                    points[t] = points.pop(node)
                return node
        raise AssertionError(f"cut {keep} not inside a completion of {L} tokens")
