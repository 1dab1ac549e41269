"""Token ids -> text for the report and viewer, with or without a tokenizer.

The trees in ``rollouts.jsonl`` hold token ids only. The run's tokenizer (``final_model/``,
else the newest checkpoint, else the configured model) turns them back into text; without
one the ids themselves are shown, so a report never fails for want of a tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Detok:
    """Decodes whole sequences and single tokens (cached: trees repeat tokens a lot)."""

    def __init__(self, tokenizer: Any | None = None):
        self.tok = tokenizer
        self._piece: dict[int, str] = {}

    def text(self, ids: Sequence[int]) -> str:
        if self.tok is None:
            return " ".join(f"[{i}]" for i in ids)
        try:
            return self.tok.decode(list(ids), skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - an odd tokenizer must not break a report
            return "".join(self.piece(i) for i in ids)

    def piece(self, i: int) -> str:
        """The text of one token (for per-token colouring)."""
        if i not in self._piece:
            s = None
            if self.tok is not None:
                try:
                    s = self.tok.decode([int(i)], skip_special_tokens=False)
                except Exception:  # noqa: BLE001
                    s = None
            self._piece[i] = s if s is not None else f"[{i}]"
        return self._piece[i]


def visible(s: str) -> str:
    """One-line form of a text: newlines and tabs shown as symbols."""
    return s.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥")


def load_run_tokenizer(run_dir: str | Path, model_name: str | None = None):
    """The run's tokenizer, or ``None`` if none can be loaded offline.

    Looks in ``final_model/``, then the newest ``checkpoints/*/model``, then the configured
    model (``model_name``; the shipped default model and local paths only, nothing is
    downloaded)."""
    run_dir = Path(run_dir)
    places: list[Path | str] = [run_dir / "final_model"]
    ck = run_dir / "checkpoints"
    if ck.is_dir():
        places += [p / "model" for p in sorted(ck.iterdir(), reverse=True) if p.name.startswith("step-")]
    if model_name:
        try:
            from ..models.loading import resolve_model_path

            places.append(resolve_model_path(model_name))
        except Exception:  # noqa: BLE001 - e.g. a preset whose files are not cached
            pass
    from transformers import AutoTokenizer

    for p in places:
        if Path(p).is_dir() and ((Path(p) / "tokenizer.json").exists() or (Path(p) / "tokenizer_config.json").exists()):
            try:
                return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except Exception:  # noqa: BLE001 - try the next place
                continue
    if model_name and os.environ.get("HF_HUB_OFFLINE") == "1":
        try:  # a hub id already in the local cache
            return AutoTokenizer.from_pretrained(model_name, local_files_only=True)
        except Exception:  # noqa: BLE001
            pass
    return None
