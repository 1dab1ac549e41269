"""The rollout tree: one explicit data structure for every sampler and estimator.

A tree belongs to one prompt. Node 0 is the root and holds the prompt tokens; every other
node holds one *segment* of generated tokens and points to its parent by index. A path from
the root to a node is the text the model saw; a leaf is a finished trajectory.

* GRPO: a depth-1 tree (root + ``num_generations`` leaves).
* SPO-chain: a trajectory cut into a chain of segment nodes; MC continuations hang off the
  chain nodes.
* SPO-tree / TreePO: genuine trees of fixed-length segments.

Everything else (paths, leaves, sub-trees, per-token arrays) is derived from the parent
pointers, never from string ids. Trees round-trip through JSONL (:func:`save_jsonl`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator


class FinishReason:
    """Why a node stopped growing. ``None`` on a node means it is internal or still active."""

    EOS = "eos"  # the model emitted its end-of-sequence token
    STOP = "stop"  # a stop string was produced
    ANSWER = "answer"  # a final answer was found (TreePO's answer + EOS rule)
    LENGTH = "length"  # max_completion_length reached: the trajectory is truncated
    DEPTH = "depth"  # the tree's max depth reached without finishing
    REPETITION = "repetition"  # TreePO's "mumbling" detector fired
    SEGMENT = "segment"  # segment length reached: not a leaf, may be extended

    #: reasons that mean the model ended its answer on its own
    COMPLETED = frozenset({EOS, STOP, ANSWER})
    #: reasons that mean the trajectory was cut off
    TRUNCATED = frozenset({LENGTH, DEPTH, REPETITION})


class NodeInfo:
    """The keys of :attr:`Node.info`, declared once (every writer and reader uses these).

    Values must stay JSON-serialisable: trees are saved to ``rollouts.jsonl``.
    """

    MC = "mc"  # True on an SPO-chain Monte-Carlo continuation (not a trajectory)
    MC_FROM = "mc_from"  # SPO-chain: boundary node whose MC estimate this duplicate state shares
    SPO_BOUNDS = "spo_bounds"  # SPO-chain, on a trajectory leaf: its boundary offsets in the completion
    SPO_NODES = "spo_nodes"  # ... the representative boundary node of each boundary
    SPO_VALUES = "spo_values"  # ... the MC value V(s_b) of each boundary (written by the algorithm)
    SPO_CANDIDATES = "spo_candidates"  # ... boundary candidates before the max_segments cap
    CORRECT = "correct"  # raw correctness of a leaf (the task's grader, before reward shaping)
    ADVANTAGE = "advantage"  # the raw advantage credited to this node's segment (or leaf's trajectory)
    TREEPO = "treepo"  # TreePO, on the root: width, initial width, fallback counts
    FALLBACK = "fallback"  # TreePO: first segment regrown from a fallback cut point
    STOPPED_MID = "stopped_mid"  # TreePO sampler, transient: an early stop decided while cutting a path


@dataclass
class Node:
    """One node of a rollout tree.

    Attributes:
        parent: index of the parent node, -1 for the root.
        depth: 0 for the root (the prompt), 1 for the first generated segment, ...
        token_ids: the tokens of this segment (the prompt tokens for the root).
        logprobs: log-probability of each token under the sampling policy (temperature-scaled
            logits, as TRL computes them). Empty for the root.
        finish_reason: a :class:`FinishReason` value for leaves, ``SEGMENT`` for a node that
            stopped at a segment boundary, ``None`` for the root.
        reward: the reward of the trajectory ending here (leaves only).
        value: a value estimate of the state at the end of this node (estimators fill it).
        children: indices of the child nodes (kept in sync by :meth:`RolloutTree.add`).
        info: per-node annotations keyed by :class:`NodeInfo` (e.g. ``NodeInfo.MC`` for SPO
            continuations, ``NodeInfo.ADVANTAGE``); JSON-serialisable values only.
    """

    parent: int
    depth: int
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    reward: float | None = None
    value: float | None = None
    children: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_leaf(self) -> bool:
        return not self.children


class RolloutTree:
    """The rollouts of one prompt as an explicit tree (see module docstring).

    Args:
        prompt_ids: the tokenised prompt (becomes the root node).
        group: index of the prompt in its batch; all nodes of the tree belong to it.
        row: the dataset row (prompt text, gold answer, other columns), passed to rewards.
    """

    def __init__(self, prompt_ids: list[int], group: int = 0, row: dict[str, Any] | None = None):
        self.nodes: list[Node] = [Node(parent=-1, depth=0, token_ids=list(prompt_ids))]
        self.group = group
        self.row: dict[str, Any] = dict(row or {})
        # Engine-owned KV cache per node (never serialised): node index -> cached state.
        self.kv: dict[int, Any] = {}

    # ----- building -----------------------------------------------------------------
    def add(
        self,
        parent: int,
        token_ids: list[int],
        logprobs: list[float],
        finish_reason: str | None = None,
        **info: Any,
    ) -> int:
        """Append a child of ``parent`` and return its index."""
        if not 0 <= parent < len(self.nodes):
            raise IndexError(f"parent {parent} not in tree of {len(self.nodes)} nodes")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} log-probs")
        node = Node(
            parent=parent,
            depth=self.nodes[parent].depth + 1,
            token_ids=list(token_ids),
            logprobs=[float(x) for x in logprobs],
            finish_reason=finish_reason,
            info=dict(info),
        )
        self.nodes.append(node)
        idx = len(self.nodes) - 1
        self.nodes[parent].children.append(idx)
        return idx

    def split(self, idx: int, offset: int) -> int:
        """Cut node ``idx`` after ``offset`` of its tokens into a chain ``head -> tail``.

        ``idx`` keeps the first ``offset`` tokens and becomes internal; a new node takes the
        rest together with ``idx``'s children, finish reason and reward. Returns the tail's
        index. Used by SPO-chain to turn a trajectory into segments whose boundaries are
        tree nodes (so MC continuations can hang off them). Cached KV is dropped for ``idx``.
        """
        node = self.nodes[idx]
        if idx == 0 or not 0 < offset < len(node.token_ids):
            raise ValueError(f"cannot split node {idx} of {len(node.token_ids)} tokens at {offset}")
        tail = Node(
            parent=idx,
            depth=node.depth + 1,
            token_ids=node.token_ids[offset:],
            logprobs=node.logprobs[offset:],
            finish_reason=node.finish_reason,
            reward=node.reward,
            children=node.children,
            info={k: v for k, v in node.info.items()},
        )
        self.nodes.append(tail)
        t = len(self.nodes) - 1
        for c in tail.children:
            self.nodes[c].parent = t
        for d in self.subtree(t)[1:]:
            self.nodes[d].depth += 1
        node.token_ids = node.token_ids[:offset]
        node.logprobs = node.logprobs[:offset]
        node.children = [t]
        node.finish_reason = FinishReason.SEGMENT
        node.reward = None
        # Cached KV of the old node covered the whole segment; move it to the tail.
        if idx in self.kv:
            self.kv[t] = self.kv.pop(idx)
        return t

    def split_every(self, idx: int, length: int) -> int:
        """Cut node ``idx`` into a chain of nodes of ``length`` tokens (the last one may be
        shorter), as repeated :meth:`split` calls would, in one pass. Returns the index of
        the last node of the chain (``idx`` itself if it has at most ``length`` tokens)."""
        if idx == 0 or length <= 0:
            raise ValueError(f"cannot split node {idx} into segments of {length} tokens (the root, or a length <= 0)")
        node = self.nodes[idx]
        n = len(node.token_ids)
        if n <= length:
            return idx
        toks, lps = node.token_ids, node.logprobs
        pieces = range(length, n, length)
        first = len(self.nodes)
        for k, a in enumerate(pieces):
            self.nodes.append(Node(
                parent=first + k - 1 if k else idx,
                depth=node.depth + k + 1,
                token_ids=toks[a : a + length],
                logprobs=lps[a : a + length],
                finish_reason=FinishReason.SEGMENT,
                children=[first + k + 1],
                info=dict(node.info),
            ))
        last_i = len(self.nodes) - 1
        last = self.nodes[last_i]
        last.finish_reason, last.reward, last.children = node.finish_reason, node.reward, node.children
        for c in last.children:
            self.nodes[c].parent = last_i
        extra = len(pieces)
        for d in self.subtree(last_i)[1:]:
            self.nodes[d].depth += extra
        node.token_ids, node.logprobs = toks[:length], lps[:length]
        node.children = [first]
        node.finish_reason, node.reward = FinishReason.SEGMENT, None
        if idx in self.kv:
            self.kv[last_i] = self.kv.pop(idx)
        return last_i

    # ----- derived views -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, idx: int) -> Node:
        return self.nodes[idx]

    def path(self, idx: int) -> list[int]:
        """Node indices from the root to ``idx`` (inclusive)."""
        out = []
        while idx >= 0:
            out.append(idx)
            idx = self.nodes[idx].parent
        return out[::-1]

    def ancestors(self, idx: int) -> list[int]:
        """Proper ancestors of ``idx`` from the root down (root first)."""
        return self.path(idx)[:-1]

    def leaves(self, include_mc: bool = True) -> list[int]:
        """Indices of nodes without children (finished trajectories), in creation order."""
        return [
            i
            for i, n in enumerate(self.nodes)
            if i > 0 and n.is_leaf and (include_mc or not n.info.get(NodeInfo.MC))
        ]

    def subtree(self, idx: int) -> list[int]:
        """``idx`` and all its descendants, depth-first (pre-order)."""
        out, stack = [], [idx]
        while stack:
            i = stack.pop()
            out.append(i)
            stack.extend(reversed(self.nodes[i].children))
        return out

    def subtree_leaves(self, idx: int, include_mc: bool = True) -> list[int]:
        return [
            i
            for i in self.subtree(idx)
            if i > 0 and self.nodes[i].is_leaf and (include_mc or not self.nodes[i].info.get(NodeInfo.MC))
        ]

    def prompt_ids(self) -> list[int]:
        return self.nodes[0].token_ids

    def path_token_ids(self, idx: int, include_prompt: bool = True) -> list[int]:
        """All tokens on the path to ``idx`` (prompt included unless told otherwise)."""
        p = self.path(idx)
        if not include_prompt:
            p = p[1:]
        return [t for i in p for t in self.nodes[i].token_ids]

    def path_logprobs(self, idx: int) -> list[float]:
        """Sampling log-probs of the generated tokens on the path to ``idx``."""
        return [x for i in self.path(idx)[1:] for x in self.nodes[i].logprobs]

    def path_len(self, idx: int) -> int:
        """Number of tokens (prompt included) on the path to ``idx``."""
        return sum(len(self.nodes[i].token_ids) for i in self.path(idx))

    def completion_len(self, idx: int) -> int:
        return self.path_len(idx) - len(self.nodes[0].token_ids)

    def segment_spans(self, idx: int) -> list[tuple[int, int, int]]:
        """``(node, start, end)`` token spans of each generated segment on the path to
        ``idx``, offsets counted within the completion (prompt excluded)."""
        spans, pos = [], 0
        for i in self.path(idx)[1:]:
            n = len(self.nodes[i].token_ids)
            spans.append((i, pos, pos + n))
            pos += n
        return spans

    def iter_depth(self, depth: int) -> Iterator[int]:
        return (i for i, n in enumerate(self.nodes) if n.depth == depth)

    def max_depth(self) -> int:
        return max(n.depth for n in self.nodes)

    def num_generated_tokens(self) -> int:
        """Tokens actually decoded for this tree (each shared prefix counted once)."""
        return sum(len(n.token_ids) for n in self.nodes[1:])

    def independent_equivalent_tokens(self, include_mc: bool = False) -> int:
        """Tokens that sampling each leaf independently (no prefix sharing) would decode."""
        total, stack = 0, [(0, 0)]  # one walk down the tree: (node, completion tokens above it)
        while stack:
            i, above = stack.pop()
            n = self.nodes[i]
            here = above + len(n.token_ids) if i else 0
            if i and n.is_leaf and (include_mc or not n.info.get(NodeInfo.MC)):
                total += here
            stack.extend((c, here) for c in n.children)
        return total

    # ----- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "row": _jsonable(self.row),
            "nodes": [asdict(n) for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RolloutTree":
        t = cls.__new__(cls)
        t.group = int(d.get("group", 0))  # read back from files: never a string into a page
        t.row = dict(d.get("row", {}))
        t.nodes = [Node(**n) for n in d["nodes"]]
        t.kv = {}
        t.validate()
        return t

    def validate(self) -> None:
        """Check structural invariants (parent/children agree, depths, array lengths)."""
        if not self.nodes or self.nodes[0].parent != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        for i, n in enumerate(self.nodes[1:], start=1):
            if not 0 <= n.parent < len(self.nodes) or n.parent == i:
                raise ValueError(f"node {i}: bad parent {n.parent}")
            if i not in self.nodes[n.parent].children:
                raise ValueError(f"node {i} missing from its parent's children")
            if n.depth != self.nodes[n.parent].depth + 1:
                raise ValueError(f"node {i}: depth {n.depth} != parent depth + 1")
            if len(n.token_ids) != len(n.logprobs):
                raise ValueError(f"node {i}: {len(n.token_ids)} tokens, {len(n.logprobs)} log-probs")


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except TypeError:
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        return str(x)


def save_jsonl(trees: Iterable[RolloutTree], path: str | Path, append: bool = False) -> None:
    """Write trees one JSON object per line (NaN rewards are written as null)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for t in trees:
            f.write(json.dumps(clean(t.to_dict())) + "\n")


def load_jsonl(path: str | Path) -> list[RolloutTree]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    out.append(RolloutTree.from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a rollout tree: {e}") from e
    return out
