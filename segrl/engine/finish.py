"""What a decode loop keeps per row: sampled tokens, log-probs, and why each row ended.

Shared by both HF engines. Per decode step the host receives only the sampled ids (one small
copy, the step's one synchronisation); the log-probs stay where they were computed and come
back once per call (:meth:`RowLog.logprobs`). A row ends on an EOS id, on a stop string, or
at its token limit; a stop string is looked for only after a token whose text can complete
one (:meth:`StopChecker.may_stop`), so most steps decode no text at all.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def reason(self, tok: int, gen: list[int], limit: int) -> str | None:
        """Why a row ends after sampling ``tok`` (``gen`` already holds it), or None."""
        if tok in self.eos:
            return FinishReason.EOS
        if self.max_chars and self.may_stop(tok) and self.hit(gen):
            return FinishReason.STOP
        if len(gen) >= limit:
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

    def hit(self, gen: list[int]) -> bool:
        # Decode a short tail (a token is at least one character for these tokenizers).
        text = self.tokenizer.decode(gen[-(self.max_chars + 2) :], skip_special_tokens=False)
        return any(s in text for s in self.stops)


class RowLog:
    """Tokens, log-probs and finish reasons of the ``B`` rows of one decode call.

    Args:
        limits: each row's token limit.
        stops: the engine's :class:`StopChecker`.
    """

    def __init__(self, limits: Sequence[int], stops: StopChecker):
        B = len(limits)
        self.limits = list(limits)
        self.stops = stops
        self.toks: list[list[int]] = [[] for _ in range(B)]
        self.reasons: list[str | None] = [None] * B
        self._lp: list[tuple[torch.Tensor, list[int]]] = []  # (log-probs [R], their rows), per step

    def record(self, alive: list[int], tok: torch.Tensor, lp: torch.Tensor) -> tuple[list[int], list[tuple[int, int]]]:
        """Append one step's sampled tokens to the live rows (``alive[b]`` = row of batch
        position b) and set the reasons of rows that ended. Returns (batch positions that go
        on, ``(b, row)`` of those that ended)."""
        tl = tok.tolist()  # the step's one copy to the host
        self._lp.append((lp, alive))
        keep: list[int] = []
        ended: list[tuple[int, int]] = []
        reason_of = self.stops.reason
        for b, r in enumerate(alive):
            gen = self.toks[r]
            gen.append(tl[b])
            reason = reason_of(tl[b], gen, self.limits[r])
            if reason is None:
                keep.append(b)
            else:
                self.reasons[r] = reason
                ended.append((b, r))
        return keep, ended

    def logprobs(self) -> list[list[float]]:
        """Each row's log-probs, in sampling order (one copy to the host for the call)."""
        out: list[list[float]] = [[] for _ in self.toks]
        if not self._lp:
            return out
        flat = torch.cat([lp.float() for lp, _ in self._lp]).tolist()
        i = 0
        for _, rows in self._lp:
            for r in rows:
                out[r].append(flat[i])
                i += 1
        return out
