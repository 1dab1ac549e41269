"""The rollout-engine contract: what samplers, evaluation and the trainer may use of an engine.

Every backend (:mod:`segrl.engine.hf_engine`, :mod:`segrl.engine.cascade_engine`,
:mod:`segrl.engine.vllm_engine`) implements :class:`RolloutEngine`; callers get one from
:func:`segrl.engine.registry.make_engine` and use nothing else of it. :class:`EngineBase`
holds what every backend shares (sampling settings, the random generators, the counters,
checkpoint state, tree creation), written once.

The one core call is :meth:`RolloutEngine.extend`: grow ``k`` children from tree nodes by up to
``L`` tokens each, continuing from whatever state the engine cached for the node's path.
Cached states live in ``tree.kv`` (engine-owned objects, never serialised);
:func:`release` drops them.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..tree import RolloutTree

NodeRef = tuple[RolloutTree, int]


@dataclass
class EngineStats:
    """Work counters (cumulative; :meth:`RolloutEngine.reset_stats` clears them)."""

    prefill_tokens: int = 0  # tokens run through the model to rebuild a context
    decode_tokens: int = 0  # tokens sampled
    forward_calls: int = 0
    extend_calls: int = 0
    kv_crops: int = 0  # states taken from a longer cached path (no recompute)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class SamplingParams:
    """How tokens are drawn (TRL's generation names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False  # decode past EOS (vLLM's name; benchmarks of fixed lengths)


@runtime_checkable
class RolloutEngine(Protocol):
    """What samplers, evaluation and the trainer use of a rollout engine (nothing else).

    Attributes:
        tokenizer: the policy's Hugging Face tokenizer (samplers decode segments with it).
        generator: a host-side (CPU) ``torch.Generator`` for the samplers' own random choices
            (TreePO's branch allocation and fallback cut points, random initial widths). It
            is checkpointed with :meth:`state_dict`. Where the engine samples on the CPU it
            draws its tokens from it too; on an accelerator the tokens come from a device
            generator seeded from the same seed (also in :meth:`state_dict`).
        stats: work counters (:class:`EngineStats`) since the last :meth:`reset_stats`.
    """

    tokenizer: Any
    generator: torch.Generator
    stats: EngineStats

    def extend(
        self,
        refs: Sequence[NodeRef],
        max_new_tokens: int | Sequence[int],
        num_children: int | Sequence[int] = 1,
        keep_kv: bool = False,
        release_sources: bool = True,
        **node_info,
    ) -> list[list[NodeRef]]:
        """Grow ``num_children`` children from each ``(tree, node)``, each up to
        ``max_new_tokens`` tokens (one value, or one per ref; 0 children skips a ref).

        ``keep_kv``: also keep the cached state of children that finished (EOS / stop), so
        that later calls can continue from inside them (SPO-chain crops).
        ``release_sources``: drop the sources' cached states afterwards (keep them if the
        same nodes will be extended again). ``node_info``: annotations stored on every new
        node (e.g. ``mc=True``).

        Returns, for each ref, its new children's refs; a child's ``finish_reason`` is
        ``eos``, ``stop`` or ``segment`` (the token limit: the sampler decides whether
        that means truncation). Children are added to the trees in ref order."""
        ...

    def new_trees(self, prompts_ids: Sequence[Sequence[int]], rows: Sequence[dict | None] | None = None) -> list[RolloutTree]:
        """One :class:`~segrl.tree.RolloutTree` per prompt (``group`` = its index, ``row`` its data row)."""
        ...

    def cache_prefix(self, tree: RolloutTree, node: int, source: int) -> bool:
        """Cache ``node``'s state as a crop of its cached descendant ``source``'s, with no
        forward pass (a TreePO fallback point cut from a finished leaf). False, caching
        nothing, where the engine cannot: the node is then prefilled when extended."""
        ...

    @staticmethod
    def release(trees: Sequence[RolloutTree]) -> None:
        """Free every cached state held by these trees."""
        ...

    def reset_stats(self) -> EngineStats:
        """Start new counters; returns the old ones."""
        ...

    def state_dict(self) -> dict:
        """The engine's random state (for checkpoints)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def sync_weights(self, model) -> None:
        """Sample from ``model``'s current weights from now on (after an optimizer step).
        A no-op for engines that decode with the policy module itself."""
        ...


def release(trees: Sequence[RolloutTree]) -> None:
    """Free every cached state held by these trees (pool rows are freed with their owners)."""
    for t in trees:
        t.kv.clear()


@contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector (the decode loop makes no reference cycles).

    A decode call creates many small objects (token lists, tensor views), and each
    generation-0 threshold crossing then walks every tracked object, trees included."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def default_eos_ids(model, tokenizer) -> list[int]:
    """The ids that end a sequence: the model's generation config, else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


def per_ref(refs: Sequence[NodeRef], max_new_tokens, num_children) -> tuple[list[int], list[int]]:
    """``extend``'s limits and child counts as one value per ref (ValueError if mis-sized)."""
    n = len(refs)
    lims = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    kids = [num_children] * n if isinstance(num_children, int) else list(num_children)
    if len(lims) != n or len(kids) != n:
        raise ValueError("max_new_tokens / num_children must be scalars or one per ref")
    return lims, kids


class EngineBase:
    """What every backend shares: sampling settings, generators, counters, checkpoint state.

    Args:
        tokenizer: the policy's tokenizer.
        params: sampling parameters.
        max_batch_size: rows decoded together.
        seed: seeds :attr:`generator` (host) and :attr:`device_generator`.
        eos_token_ids: ids that end a sequence.
        device: where tokens are sampled; on the CPU :attr:`device_generator` is
            :attr:`generator` itself (one random stream, as samplers and engines shared
            before sampling moved to the device).
    """

    def __init__(self, tokenizer, params: SamplingParams | None, max_batch_size: int, seed: int, eos_token_ids: Sequence[int], device=None):
        self.tokenizer = tokenizer
        self.params = params or SamplingParams()
        self.max_batch_size = max_batch_size
        self.device = torch.device(device or "cpu")
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        if self.device.type == "cpu":
            self.device_generator = self.generator
        else:
            self.device_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.eos_token_ids = set() if self.params.ignore_eos else set(int(e) for e in eos_token_ids)
        self.stats = EngineStats()

    def reset_stats(self) -> EngineStats:
        old, self.stats = self.stats, EngineStats()
        return old

    def state_dict(self) -> dict:
        st = {"generator": self.generator.get_state()}
        if self.device_generator is not self.generator:
            st["device_generator"] = self.device_generator.get_state()
        return st

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.device_generator is not self.generator and "device_generator" in state:
            self.device_generator.set_state(state["device_generator"])

    release = staticmethod(release)

    def new_trees(self, prompts_ids: Sequence[Sequence[int]], rows=None) -> list[RolloutTree]:
        rows = rows if rows is not None else [None] * len(prompts_ids)
        return [RolloutTree(list(p), group=i, row=r) for i, (p, r) in enumerate(zip(prompts_ids, rows))]

    def cache_prefix(self, tree: RolloutTree, node: int, source: int) -> bool:
        return False

    def sync_weights(self, model) -> None:
        return None
