"""What a decode loop keeps per row: sampled tokens, log-probs, and why each row ended.

Shared by both HF engines. Per decode step the host receives only the sampled ids (one small
copy, the step's one synchronisation); the log-probs stay where they were computed and come
back once per call (:meth:`RowLog.logprobs`). A row ends on an EOS id, on a stop string, or
at its token limit, checked for a whole step at once; a stop string is looked for only after
a token whose text can complete one (:meth:`StopChecker.may_stop`), so most steps decode no
text at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..tree import FinishReason


class StopChecker:
    """EOS ids and stop strings of one engine (a token's stop-candidacy is cached)."""

    def __init__(self, tokenizer, eos_token_ids, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.eos = eos_token_ids
        self.stops = tuple(stop_strings)
        self.max_chars = max((len(s) for s in self.stops), default=0)
        self._candidate: dict[int, bool] = {}

    def reason(self, tok: int, tail: list[int], n: int, limit: int) -> str | None:
        """Why a row ends after sampling ``tok`` as its ``n``-th token (``tail``: its last
        tokens, ``tok`` included), or None."""
        if tok in self.eos:
            return FinishReason.EOS
        if self.max_chars and self.may_stop(tok) and self.hit(tail):
            return FinishReason.STOP
        if n >= limit:
            return FinishReason.SEGMENT
        return None

    def may_stop(self, tok: int) -> bool:
        """Whether sampling ``tok`` can complete a stop string: its text holds the last
        character of one, or is partial/empty (a byte of a multi-byte character). Checked
        first so that the tail is decoded only for these tokens."""
        hit = self._candidate.get(tok)
        if hit is None:
            text = self.tokenizer.decode([tok], skip_special_tokens=False)
            hit = not text or "\ufffd" in text or any(not s or s[-1] in text for s in self.stops)
            self._candidate[tok] = hit
        return hit

    def hit(self, tail: list[int]) -> bool:
        # Decode a short tail (a token is at least one character for these tokenizers).
        text = self.tokenizer.decode(tail[-(self.max_chars + 2) :], skip_special_tokens=False)
        return any(s in text for s in self.stops)


class RowLog:
    """Tokens, log-probs and finish reasons of the ``B`` rows of one decode call.

    Tokens go into one ``[B, longest limit]`` array, a step's ids in one vectorised write;
    only rows that may end this step (an EOS id, the token limit, a token that can complete
    a stop string) are looked at one by one.

    Args:
        limits: each row's token limit.
        stops: the engine's :class:`StopChecker`.
    """

    def __init__(self, limits: Sequence[int], stops: StopChecker):
        B = len(limits)
        self.limits = np.asarray(limits, dtype=np.int64)
        self.stops = stops
        self.ids = np.zeros((B, max(limits, default=0)), dtype=np.int64)
        self.n = np.zeros(B, dtype=np.int64)  # tokens sampled per row
        self.reasons: list[str | None] = [None] * B
        self._eos = np.asarray(sorted(stops.eos), dtype=np.int64)
        self._lp: list[tuple[torch.Tensor, list[int]]] = []  # (log-probs [R], their rows), per step

    def count(self, r: int) -> int:
        return int(self.n[r])

    def last(self, r: int) -> int | None:
        """Row ``r``'s last sampled token (None before its first)."""
        return int(self.ids[r, self.n[r] - 1]) if self.n[r] else None

    def tokens(self, r: int) -> list[int]:
        return self.ids[r, : self.n[r]].tolist()

    def record(self, alive: list[int], tok: torch.Tensor, lp: torch.Tensor) -> tuple[list[int], list[tuple[int, int]]]:
        """Append one step's sampled tokens to the live rows (``alive[b]`` = row of batch
        position b) and set the reasons of rows that ended. Returns (batch positions that go
        on, ``(b, row)`` of those that ended)."""
        t = (tok if tok.device.type == "cpu" else tok.cpu()).numpy()  # the step's one copy to the host
        self._lp.append((lp, alive))
        rows = np.asarray(alive, dtype=np.int64)
        n = self.n[rows] + 1
        self.ids[rows, n - 1] = t
        self.n[rows] = n
        maybe = n >= self.limits[rows]
        if len(self._eos):
            maybe |= np.isin(t, self._eos)
        if self.stops.max_chars:
            may_stop = self.stops.may_stop
            maybe |= np.fromiter((may_stop(x) for x in t.tolist()), dtype=bool, count=len(t))
        if not maybe.any():
            return list(range(len(alive))), []
        ended: list[tuple[int, int]] = []
        ending = set()
        reason_of, tail = self.stops.reason, self.stops.max_chars + 2
        for b in np.flatnonzero(maybe).tolist():
            r, k = alive[b], int(n[b])
            reason = reason_of(int(t[b]), self.ids[r, max(0, k - tail) : k].tolist(), k, int(self.limits[r]))
            if reason is not None:
                self.reasons[r] = reason
                ended.append((b, r))
                ending.add(b)
        return [b for b in range(len(alive)) if b not in ending], ended

    def logprobs(self) -> list[list[float]]:
        """Each row's log-probs, in sampling order (one copy to the host for the call)."""
        out: list[list[float]] = [[] for _ in self.reasons]
        if not self._lp:
            return out
        flat = torch.cat([lp.float() for lp, _ in self._lp]).tolist()
        i = 0
        for _, rows in self._lp:
            for r in rows:
                out[r].append(flat[i])
                i += 1
        return out
