"""Same seed, same machine, same ``--threads``: the same run.

With more than one CPU thread, the backward of an indexed gather (``x[idx]``: the shared-context
forward fans a context's KV cache out to the rows that continue it) adds gradient rows with
atomic float additions from several threads, in whatever order the threads get there. Rounding
then differs from run to run by ~1e-7, and training amplifies it until sampled tokens differ.
torch's deterministic mode (``torch.use_deterministic_algorithms``) sorts the indices and adds
in a fixed order instead. See docs/reliability.md for the experiment and what stays
non-reproducible.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def wanted(setting: bool | None, device: torch.device) -> bool:
    """``train.deterministic``: None (default) means on for CPU runs, off on accelerators
    (their deterministic kernels are slower and need ``CUBLAS_WORKSPACE_CONFIG``)."""
    return (device.type == "cpu") if setting is None else bool(setting)


@contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic kernels inside the block (restored afterwards). ``warn_only``: an
    op without a deterministic version warns instead of failing. Uninitialised memory is not
    NaN-filled (segrl never reads it; filling costs time on every allocation)."""
    if not enabled:
        yield
        return
    try:
        import torch.utils.deterministic as det
    except ImportError:  # torch < 2.1: no fill setting
        det = None
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = getattr(det, "fill_uninitialized_memory", None)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if fill is not None:
        det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if fill is not None:
            det.fill_uninitialized_memory = fill
