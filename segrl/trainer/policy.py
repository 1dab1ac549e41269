"""The policy forward the trainer runs forward/backward through, wrapped for DDP or FSDP2.

:class:`LogProbModule` turns a :class:`segrl.trainer.batching.Batch` into per-token log-probs
and entropies; :func:`wrap_policy` puts it in DDP or FSDP2 under ``torchrun``. The collectives
and the wrapped-module helpers (gradient sync, gathering for rollout/export) are in
:mod:`segrl.distributed`.
"""

from __future__ import annotations

import torch

from ..algos.logprobs import sequence_logprobs, shared_context_logprobs
from ..distributed import DistInfo, fsdp_modules
from .batching import Batch


class LogProbModule(torch.nn.Module):
    """``forward(batch, temperature, chunk_size, share_contexts)`` = per-token log-probs and
    entropies ``[B, R]`` of a :class:`segrl.trainer.batching.Batch`'s responses under the
    wrapped causal LM. DDP and FSDP2 hook a module's ``forward``; log-probs are computed from
    the decoder body and the LM head directly (chunked, never the full logits), so they are
    wrapped in this module and the wrapper is what DDP/FSDP see."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, temperature: float = 1.0, chunk_size: int = 64, share_contexts: bool = True):
        if share_contexts:
            return shared_context_logprobs(
                self.model, batch.context_ids, batch.context_mask, batch.context_index,
                batch.response_ids, batch.response_mask, temperature, chunk_size,
            )
        ids, attn, C = batch.full()
        return sequence_logprobs(self.model, ids, attn, C, temperature, chunk_size)


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return list(getattr(body, "layers", []))


def wrap_policy(model, info: DistInfo, device: str):
    """The module the trainer runs forward/backward through: a :class:`LogProbModule`, in
    DDP or FSDP2 when ``info.enabled``. Build the optimizer over its parameters *after* this
    call (FSDP2 replaces parameters with sharded ones)."""
    mod = LogProbModule(model)
    if not info.enabled:
        return mod
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if str(device).startswith("cuda") else None
        return DDP(mod, device_ids=ids, broadcast_buffers=False)
    if info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(mod)
        # FSDP2 initialises lazily from the first module that runs forward, which must be the
        # root: run one tiny forward through it now (the engine later calls the layers directly).
        dev = next(model.parameters()).device
        d = dev if dev.type != "meta" else torch.device("cpu")
        one = torch.ones(1, 1, dtype=torch.long, device=d)
        with torch.no_grad():
            mod(Batch(one, one, torch.zeros(1, dtype=torch.long, device=d), one, one, *[one.float()] * 3), share_contexts=False)
        for m in fsdp_modules(mod):  # the root stays gathered after a forward: put the
            m.reshard()  # sharded parameters back before the optimizer collects them
        return mod
    raise ValueError(f"distributed.strategy must be ddp or fsdp, got {info.strategy!r}")
