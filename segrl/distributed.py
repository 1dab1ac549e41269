"""Multi-process training on ``torch.distributed`` (launched with ``torchrun``).

Data parallelism, as in TRL/verl:

* each rank gets a disjoint slice of every step's prompts (``shard``) and rolls its own trees
  out; every prompt's whole group lives on one rank, so *group* statistics (GRPO/RLOO
  baselines, SPO/TreePO tree values) are rank-local and exact;
* *batch* statistics are all-reduced: the loss normalisers (masked tokens, sequences,
  micro-batches) and ``scale_rewards=batch``'s reward std (:func:`global_mean_std`), so the
  loss of the whole global batch is what a single process would compute on it;
* gradients are summed across ranks by DDP (small models: every rank holds the whole model)
  or FSDP2 ``fully_shard`` (large models: parameters, gradients and optimizer state are
  sharded); the local loss is multiplied by the world size to undo their averaging;
* the rollout engine samples with the *unwrapped* module (no collectives while decoding, so
  ranks may decode different numbers of steps). Under FSDP2 the parameters are gathered for
  the rollout (:func:`gathered_for_rollout`).

This module is the bottom layer of that: process group, collectives and the DDP/FSDP2
helpers around a wrapped module; it imports nothing from segrl. The policy forward that
DDP/FSDP2 wrap (:class:`segrl.trainer.policy.LogProbModule`, :func:`segrl.trainer.policy.wrap_policy`)
lives with the trainer. A batch-wide whitening is
``segrl.algos.advantages.masked_whiten(x, mask, stats=global_mean_std)``.

Everything here is a no-op in a single process, so the trainer calls it unconditionally.
``torchrun --nproc_per_node N -m segrl.cli train ...`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; :func:`setup` reads them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def setup(backend: str = "auto", strategy: str = "ddp", device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op without one).

    ``backend=auto`` picks NCCL when the run is on CUDA and gloo otherwise. Returns a
    :class:`DistInfo`. On CUDA each rank should use ``cuda:LOCAL_RANK``
    (:func:`rank_device`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not is_initialized():
        return DistInfo(strategy=strategy)
    if not is_initialized():
        on_cuda = (device or "cpu").startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        be = backend if backend != "auto" else ("nccl" if on_cuda else "gloo")
        if be == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(be, timeout=datetime.timedelta(minutes=30))
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=dist.get_backend(),
        strategy=strategy,
    )


def rank_device(device: str, info: DistInfo) -> str:
    """``cuda``/``auto`` -> ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    if info.enabled and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{info.local_rank}"
    return device


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x):
    """Sum of ``x`` over ranks: a float/int (returned as float) or a tensor (a new tensor)."""
    if not is_initialized() or get_world_size() == 1:
        return float(x) if not isinstance(x, torch.Tensor) else x.clone()
    if isinstance(x, torch.Tensor):
        t = x.detach().to(_comm_device(), torch.float64).clone()
        dist.all_reduce(t)
        return t.to(x.device, x.dtype)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_dict(d: dict[str, float]) -> dict[str, float]:
    """Sum every value of a ``{name: float}`` over ranks (one collective; same keys on every
    rank required, in any order)."""
    if not is_initialized() or get_world_size() == 1:
        return dict(d)
    keys = sorted(d)
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def global_mean_std(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, float]:
    """``(count, mean, unbiased std)`` of ``x`` (optionally only where ``mask``) over all ranks.

    Three sums (n, sum x, sum x^2 after centring on the global mean) are all-reduced, so the
    result equals ``x.mean(), x.std()`` of the concatenation of every rank's values."""
    x = x.detach().to(torch.float64).flatten()
    m = torch.ones_like(x) if mask is None else mask.detach().to(torch.float64).flatten()
    s = all_reduce_sum(torch.stack([m.sum(), (x * m).sum()]))
    n, tot = float(s[0]), float(s[1])
    mean = tot / n if n > 0 else 0.0
    sq = all_reduce_sum((((x - mean) ** 2) * m).sum())
    std = (float(sq) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return n, mean, std


def shard(items: list, info: DistInfo | None = None) -> list:
    """This rank's slice ``items[rank::world_size]``."""
    r, w = (info.rank, info.world_size) if info else (get_rank(), get_world_size())
    return list(items[r::w])


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------- DDP / FSDP2 helpers around a wrapped module ---


def is_fsdp(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def grad_sync(module, enabled: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when
    ``enabled`` (the last micro-batch of an optimizer step), as gradient accumulation needs."""
    if hasattr(module, "no_sync") and not enabled:
        return module.no_sync()
    if is_fsdp(module):
        module.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def fsdp_modules(module) -> list:
    return [m for m in module.modules() if is_fsdp(m)] if is_fsdp(module) else []


def unshard_for_export(module) -> None:
    """Under FSDP2: gather the full weights on every rank for good (end of training: the
    final evaluation and ``save_pretrained`` then see plain tensors). Collective; no-op
    otherwise."""
    fs = fsdp_modules(module)
    for m in fs:
        m.unshard()
        m.set_reshard_after_forward(False)
    if fs:
        module._segrl_exported = True


@contextlib.contextmanager
def gathered_for_rollout(module):
    """Under FSDP2: gather every sharded parameter for the duration (the engine then decodes
    with plain tensors and no collectives) and reshard afterwards. Collective (every rank
    must enter it); no-op otherwise."""
    fs = fsdp_modules(module)
    if not fs or getattr(module, "_segrl_exported", False):
        yield
        return
    for m in fs:
        m.unshard()
    # While gathered, the forward hooks must neither reshard nor all-gather again.
    for m in fs:
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in fs:
            m.set_reshard_after_forward(True)
            m.reshard()


class _ExportView:
    """A causal LM whose ``save_pretrained`` writes a given full state dict: FSDP2 modules
    return sharded DTensors from ``state_dict()``, which safetensors cannot write."""

    def __init__(self, model, state_dict):
        self.__dict__["_m"] = model
        self.__dict__["_sd"] = state_dict

    def __getattr__(self, name):
        return getattr(self._m, name)

    def __call__(self, *args, **kw):
        return self._m(*args, **kw)

    def save_pretrained(self, path, *args, **kw):
        kw.setdefault("state_dict", self._sd)
        return self._m.save_pretrained(path, *args, **kw)


def export_view(model, policy):
    """``model`` itself, or under FSDP2 a view of it whose ``save_pretrained`` writes the full
    weights (gathered to CPU on rank 0 here: collective, every rank must call it)."""
    if not fsdp_modules(policy):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _ExportView(model, {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()})
