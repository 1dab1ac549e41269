"""Static-shape decode steps for the pool engine's ``flat`` layout, replayed as CUDA graphs.

In the ``flat`` layout every decoding row attends only its own tail row, and the scheduler
keeps the live rows in the pool's front rows (:meth:`~segrl.engine.kv_pool.KVPool.pack` with
``front=True``). A step then runs over the window of the first ``Wb`` pool rows and ``Tb``
positions, ``Wb`` and ``Tb`` rounded up to buckets (:func:`bucket`): window rows that hold no
live row are padding (their new key/value goes to a scratch row, their logits are dropped),
and positions past a row's length are masked. The step's inputs are four small index
tensors in static buffers, so one CUDA graph per ``(Wb, Tb)`` bucket replays the whole
forward (embedding to logits) with no per-kernel launch cost; all graphs share one memory
pool. Sampling runs eagerly on the live rows' logits (the same draws as the unbucketed path).

Capture is lazy (first use of a bucket): warm-up on a side stream, capture into the shared
pool, replay. A capture that fails turns graphs off for the engine with a one-line warning
(the same static shapes then run eagerly). Graphs are dropped when the tail pool is
reallocated or the weights move (a new signature of data pointers); in-place optimizer
updates need no recapture (the fused weights are refreshed in place). On the CPU the same
static-shape path runs eagerly (tested against the unbucketed path).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .cascade_attention import key_mask
from .kv_pool import KVPool, Slot
from .model_runner import LlamaRunner
from .scheduler import CascadeDecode


def bucket(n: int, base: int) -> int:
    """The smallest of ``base * 2**k`` and ``1.5 * base * 2**k`` (k >= 0) that is >= ``n``:
    at most a third of a bucket is padding, and a run meets few distinct shapes."""
    size = base
    while size < n:
        half = size + size // 2
        if half >= n:
            return half
        size *= 2
    return size


@dataclass(eq=False)
class _Shape:
    """Static buffers (and the captured graph) of one ``(rows, positions)`` bucket. ``dev``
    holds, for the ``Wb`` window rows, where each row's new key/value goes (``Wb * Hkv`` flat
    indices), the keys each row attends (``Wb``) and the live rows' window rows (a prefix of
    ``Wb``); ``host`` stages them (pinned on CUDA) for one transfer per step."""

    inp: torch.Tensor  # [Wb] token fed per window row
    pos: torch.Tensor  # [Wb] its position
    dev: torch.Tensor  # [Wb * Hkv + 2 * Wb] put, valid, trow
    host: torch.Tensor  # the same on the host
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # the graph's logits [Wb, V]

    @property
    def rows(self) -> int:
        return self.inp.shape[0]

    def put(self, t: torch.Tensor) -> torch.Tensor:
        return t[: t.shape[0] - 2 * self.rows]

    def valid(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] - 2 * self.rows
        return t[n : n + self.rows]

    def trow(self, t: torch.Tensor) -> torch.Tensor:
        return t[t.shape[0] - self.rows :]


class StaticStep:
    """Bucketed static-shape decode steps over a tail pool (see the module docstring).

    Args:
        runner: the engine's model runner.
        tails: the engine's tail pool.
        device: where the model is.
        graphs: capture and replay CUDA graphs (CUDA only); else run the static shapes eagerly.
        row_base, pos_base: the smallest row and position buckets.
    """

    def __init__(self, runner: LlamaRunner, tails: KVPool, device, graphs: bool, row_base: int = 8, pos_base: int = 64):
        self.runner, self.tails, self.device = runner, tails, torch.device(device)
        self.graphs = graphs and self.device.type == "cuda"
        self.row_base, self.pos_base = row_base, pos_base
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.scratch: Slot | None = None
        self.mempool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._sig: tuple | None = None
        self._wsig: tuple = ()
        self.captures = 0  # graphs captured so far (inspection, tests)

    # ----- per decode call -----------------------------------------------------------------
    def prepare(self, rows: int, positions: int) -> None:
        """Make the pool hold the largest window and positions of a call of ``rows`` rows
        and ``positions`` positions, and take a scratch row for padding rows' writes."""
        self.tails.ensure(bucket(rows, self.row_base) + 1, bucket(positions, self.pos_base))
        self._wsig = self.runner.weight_ptrs()
        if self.scratch is None:
            self.tails.reserve(1, 1)
            self.scratch = self.tails.alloc(1)[0]

    def release(self) -> None:
        if self.scratch is not None:
            self.tails.release(self.scratch)
            self.scratch = None

    def _signature(self) -> tuple:
        t = self.tails
        return (t.K[0].data_ptr(), t.V[-1].data_ptr(), t.rows, t.positions, self._wsig)

    # ----- one step --------------------------------------------------------------------------
    def logits(self, inp: torch.Tensor, pos: torch.Tensor, trow: torch.Tensor, plan) -> torch.Tensor:
        """Logits ``[R, V]`` of the live rows (batch order) fed ``inp`` at ``pos``; ``trow``
        (host): their tail-pool rows, all in the front window."""
        tails = self.tails
        Hkv = self.runner.heads[1]
        at = tails.lens[trow]
        Wb = bucket(int(trow.max()) + 1, self.row_base)
        Tb = bucket(int(at.max()) + 1, self.pos_base)
        sig = self._signature()
        if sig != self._sig:  # the pool or the weights moved: shapes captured before are stale
            self.shapes.clear()
            self._sig = sig
        st = self._shape(Wb, Tb, plan)
        # Staged on the host and copied in one transfer (from pinned memory on CUDA: it does
        # not wait; the buffer is rewritten only after this step's ids came back, so after it).
        R, P, h = trow.shape[0], tails.positions, st.host
        put = st.put(h).view(Wb, Hkv)
        put.copy_(self.scratch.row * Hkv * P + torch.arange(Hkv) * P)  # type: ignore[union-attr]
        put[trow] = (trow[:, None] * Hkv + torch.arange(Hkv)) * P + at[:, None]
        valid = st.valid(h)
        valid.copy_(tails.lens[:Wb])
        valid[trow] = at + 1
        valid.clamp_(min=1)
        st.trow(h)[:R].copy_(trow)
        st.dev.copy_(h, non_blocking=True)
        trow_d = st.trow(st.dev)[:R]
        st.inp.zero_().index_copy_(0, trow_d, inp)
        st.pos.zero_().index_copy_(0, trow_d, pos)
        if st.graph is not None:
            st.graph.replay()
            out = st.out
        else:
            out = self._forward(st, Tb, plan)
        return out.index_select(0, trow_d)  # type: ignore[union-attr]

    def _forward(self, st: _Shape, Tb: int, plan) -> torch.Tensor:
        mask = key_mask(st.valid(st.dev), Tb)
        return self.runner.forward(st.inp, st.pos, self.tails, st.put(st.dev), (0, st.rows, Tb), mask, None, [], plan)

    def _shape(self, Wb: int, Tb: int, plan) -> _Shape:
        st = self.shapes.get((Wb, Tb))
        if st is None:
            Hkv, dev = self.runner.heads[1], self.device
            n = Wb * Hkv + 2 * Wb
            host = torch.ones(n, dtype=torch.long, pin_memory=dev.type == "cuda")
            host[: Wb * Hkv] = self.scratch.row * Hkv * self.tails.positions  # type: ignore[union-attr]  (writes go to scratch)
            z = torch.zeros(Wb, dtype=torch.long, device=dev)
            st = _Shape(z, z.clone(), host.to(dev), host)
            if self.graphs:
                self._capture(st, Tb, plan)
            self.shapes[(Wb, Tb)] = st
        return st

    def _capture(self, st: _Shape, Tb: int, plan) -> None:
        """Capture the step for this bucket (its buffers point every write at the scratch
        row, so the warm-up runs change nothing); on failure turn graphs off, warning once."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(st, Tb, plan)
            torch.cuda.current_stream(self.device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.mempool):
                st.out = self._forward(st, Tb, plan)
            st.graph = g
            self.captures += 1
        except Exception as e:  # noqa: BLE001 - any capture failure: eager from now on
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                pass  # the failed capture's own error is the one to report
            st.graph, st.out = None, None
            self.graphs = False
            self.shapes.clear()
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            warnings.warn(f"segrl: CUDA graph capture failed, decoding eagerly ({why})", stacklevel=2)


class StaticDecode(CascadeDecode):
    """A decode call whose steps run through :class:`StaticStep` (``flat`` layout): the live
    rows are packed into the pool's front rows, and each step runs the bucketed window."""

    def run(self):
        rows = min(self.B, max(1, self.eng.max_batch_size))
        self.eng._static.prepare(rows, self.positions)
        return super().run()

    def logits(self) -> torch.Tensor:
        return self.eng._static.logits(self.inp, self.pos, self.trow, self.plan)

    def pack(self, slots: list[Slot]) -> int:
        return self.kv.tails.pack(slots, front=True)

    def close(self) -> None:
        self.eng._static.release()
