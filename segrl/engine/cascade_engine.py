"""The KV-pool engine: tree decoding over KV pools, with cascade attention over shared prefixes.

:class:`~segrl.engine.hf_engine.Engine` gives every row its own ``DynamicCache`` copy of its
path, so the 16 leaves of a TreePO tree move 16 copies of the prompt and of every shared
segment through memory at every decode step, and the cache grows by concatenation. Here a
node's cached state is a chain of shared blocks plus a private tail, all rows of pools that
outlive a call and are written in place; vLLM v1's parts, one module each:

* KV manager (:mod:`segrl.engine.kv_manager`, :mod:`segrl.engine.kv_pool`): states, shared
  blocks, forks and crops in pools;
* scheduler (:mod:`segrl.engine.scheduler`): one decode call with continuous batching;
* model runner (:mod:`segrl.engine.model_runner`): the LLaMA-family decode step;
* attention backend (:mod:`segrl.engine.cascade_attention`, metadata in
  :mod:`segrl.engine.cascade_levels`): each row against its private tail and, grouped by
  block, against the blocks it reads, with one softmax over the union; the KV a step reads
  is close to the *distinct* KV of the live trees, not rows x path length;
* CUDA graphs (:mod:`segrl.engine.cuda_graphs`): the ``flat`` layout's decode step replayed
  per bucket of static shapes.

Layouts: ``cascade`` (shared blocks: the CPU's default) and ``flat`` (no blocks: every row
holds its whole path in its tail row, so a step's shapes depend only on the number of rows
and positions, which bucketing makes static: CUDA's default). Prefill runs the transformers
forward (SDPA). Other architectures: :func:`unsupported_reason` says why, and the factory
(:mod:`segrl.engine.registry`) keeps :class:`~segrl.engine.hf_engine.Engine`.
"""

from __future__ import annotations

import sys

import torch

from .cascade_attention import key_mask
from .cascade_levels import LevelView, chain_index
from .cuda_graphs import StaticDecode, StaticStep
from .hf_engine import Engine
from .kv_manager import Block, CascadeState, KVManager
from .kv_pool import KVPool
from .model_runner import LayerPlan, LlamaRunner, unsupported_reason
from .scheduler import CascadeDecode

__all__ = ["Block", "CascadeEngine", "CascadeState", "unsupported_reason"]

_Level = LevelView  # the name tests and older code use


class CascadeEngine(Engine):
    """:class:`Engine` over KV pools (same API, same sampling, same random stream while a
    call fits in ``max_batch_size`` rows; a larger call starts waiting rows as others finish
    instead of decoding static batches one after another).

    Cached states are :class:`CascadeState` objects whose KV lives in pools owned by the
    engine (one per block level, one for private tails), reused across calls. A node inside
    a longer cached path (an SPO-chain boundary) gets a crop of it, copied into a private
    tail, where the crop lies past the level-0 context; :meth:`cache_prefix` crops one
    explicitly (TreePO's fallback points).

    Args (beyond :class:`Engine`'s):
        layout: ``cascade`` or ``flat`` (module docstring).
        cuda_graphs: with static shapes on CUDA, replay the decode step as CUDA graphs.
        static_shapes: run the ``flat`` layout's steps in bucketed static shapes
            (:mod:`segrl.engine.cuda_graphs`; default: on CUDA).
    """

    #: A state continued by several rows becomes a shared block only if its tail has at least
    #: this many tokens; a shorter tail is copied into each row's own tail. A block saves
    #: reading the tail once per extra row and step but costs one more grouped attention per
    #: layer and step, plus packing: short TreePO segments were faster copied
    #: (the notes in history/).
    fork_min_tokens = 24

    def __init__(self, model, tokenizer, *args, layout: str = "cascade", cuda_graphs: bool = False, static_shapes=None, **kwargs):
        if layout not in ("cascade", "flat"):
            raise ValueError(f"CascadeEngine layout must be 'cascade' or 'flat', got {layout!r}")
        self._runner = LlamaRunner(model)  # raises for unsupported models
        super().__init__(model, tokenizer, *args, **kwargs)
        self.layout = layout
        self._kv = KVManager(self._runner.pool_args, flat=layout == "flat")
        if layout == "flat":
            self.fork_min_tokens = sys.maxsize  # never a shared block
        if static_shapes is None:
            static_shapes = layout == "flat" and self.device.type == "cuda"
        if static_shapes and layout != "flat":
            raise ValueError("static_shapes needs the flat layout")
        self._static = StaticStep(self._runner, self._kv.tails, self.device, cuda_graphs) if static_shapes else None
        self._consume = True

    # ----- pools (names the tests use) ---------------------------------------------------
    @property
    def _tails(self) -> KVPool:
        return self._kv.tails

    @property
    def _levels(self) -> list[KVPool]:
        return self._kv.levels

    _chain_index = staticmethod(chain_index)

    # ----- the engine's hooks ------------------------------------------------------------
    def extend(self, refs, max_new_tokens, num_children=1, keep_kv=False, release_sources=True, **node_info):
        # A source that is released afterwards hands its tail row to its last child instead
        # of having it copied (all of a call's rows go to one _decode: _rows_per_decode).
        self._consume = release_sources
        return super().extend(refs, max_new_tokens, num_children, keep_kv, release_sources, **node_info)

    def _rows_per_decode(self) -> int:
        return sys.maxsize  # one call; it keeps <= max_batch_size rows decoding (continuous batching)

    def _crop(self, state: CascadeState, positions: int) -> CascadeState | None:
        return self._kv.crop(state, positions)

    def _prefill(self, refs):
        """Prefill with the transformers forward, then store each context in the pools."""
        return [self._kv.store_context(kv) for kv in super()._prefill(refs)]

    def _decode(self, rows, limits: list[int], keep_kv: bool):
        call = StaticDecode if self._static is not None else CascadeDecode
        return call(self, rows, limits, keep_kv, self._consume).run()

    def _step(self, inp, pos, trow: torch.Tensor, buf: tuple[int, int], levels: list[LevelView], plan: list[LayerPlan]) -> torch.Tensor:
        """One decode step for the live rows; returns next-token logits ``[R, V]``.

        ``trow`` (host): each live row's tail-pool row (all within the window ``buf = (lo, n)``:
        rows ``[lo, lo + n)``, attended in place; outputs of dead rows there are dropped); the
        new token goes at the row's current length. Each level's blocks are attended grouped."""
        Hkv = self._runner.heads[1]
        tails, dev = self._kv.tails, self.device
        lo, nbuf = buf
        R = trow.shape[0]
        at = tails.lens[trow]
        T = int(at.max()) + 1
        brow = trow - lo  # row in the window
        dense = R == nbuf and bool((brow == torch.arange(R)).all())
        valid = tails.lens[lo : lo + nbuf].clone()
        valid[brow] = at + 1
        # Where each row's new key/value goes in a layer's pool viewed as [rows*Hkv*P, D]:
        # one index_copy_ per layer and store (advanced-index assignment costs several times more).
        P = tails.K[0].shape[2]
        put = ((trow[:, None] * Hkv + torch.arange(Hkv)) * P + at[:, None]).reshape(-1)
        mask = key_mask(valid.to(dev, non_blocking=True), T)  # once per step, for every layer
        rows = None if dense else brow.to(dev, non_blocking=True)
        return self._runner.forward(inp, pos, tails, put.to(dev, non_blocking=True), (lo, nbuf, T), mask, rows, levels, plan)
