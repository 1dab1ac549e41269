"""Optional adapter for `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_.

``pip install 'segrl[reasoning-gym]'`` (PyPI ``reasoning-gym``). Importing this module does not
need the package; :func:`reasoning_gym_task` imports it when called.

A reasoning-gym data set is procedural: ``reasoning_gym.create_dataset(name, size=..., seed=...,
**config)`` generates ``size`` entries ``{"question", "answer", "metadata"}`` deterministically,
and the data set's ``score_answer(answer, entry)`` is the verifier (1.0 = correct; some data sets
give partial credit). The task:

* rows: ``{"prompt", "answer", "id", "question", "rg_index"}``; ``prompt`` is
  :data:`RG_TEMPLATE` with the question inserted at ``{question}``; ``id`` is
  ``"<name>-<seed>-<index>"``; ``rg_index`` is the entry's index in the generated data set;
* split: the generated entries are split with :func:`segrl.tasks.rows.split_rows`
  (``test_fraction`` of them, chosen by hash of the id, are the test part);
* grading: :class:`ReasoningGymScorer` extracts the text inside the last
  ``<answer>...</answer>`` (an unclosed final ``<answer>`` also counts, for engines that drop
  the stop string) and calls ``score_answer`` on the regenerated entry ``rg_index`` (or, when
  that column is missing, on ``{"answer": answer, "metadata": {}}``). Scores are 1.0/0.0
  (``score == 1``) unless ``partial_credit=True``. A verifier that raises scores 0.0.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Sequence
from typing import Any

from segrl.rewards.math_grading import completion_text
from segrl.tasks.base import Task
from segrl.tasks.rows import format_prompt, split_rows

logger = logging.getLogger(__name__)

__all__ = ["RG_STOP_STRINGS", "RG_TEMPLATE", "ReasoningGymScorer", "extract_tagged_answer", "reasoning_gym_task"]

RG_TEMPLATE = (
    "{question}\n\nThink step by step, then give only the final answer between <answer> and </answer> tags.\n"
)
RG_STOP_STRINGS = ("</answer>",)


def _import_rg():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "reasoning_gym_task needs the optional package reasoning-gym: pip install 'segrl[reasoning-gym]'"
        ) from e
    return reasoning_gym


def _check_name(rg, name: str) -> None:
    """``LookupError`` naming the closest data sets when reasoning-gym has no ``name``."""
    known = getattr(getattr(rg, "factory", None), "DATASETS", None)
    if not isinstance(known, dict) or name in known:
        return
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"it has {len(known)}, e.g. {', '.join(sorted(known)[:5])}"
    raise LookupError(f"reasoning-gym has no data set {name!r} ({hint})")


def extract_tagged_answer(text: str | None, tag: str = "answer") -> str | None:
    """Text inside the last ``<tag>...</tag>``; else the text after a final unclosed ``<tag>``;
    else ``None``. Stripped."""
    if not text:
        return None
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    last_open = text.rfind(f"<{tag}>")
    last_close = text.rfind(f"</{tag}>")
    if last_open > last_close:  # unclosed final tag (the stop string was cut off)
        return text[last_open + len(tag) + 2 :].strip()
    if matches:
        return matches[-1].strip()
    return None


class ReasoningGymScorer:
    """TRL-style reward function ``f(prompts, completions, answer, rg_index=None, **kw)`` that
    scores with the reasoning-gym data set's own ``score_answer``.

    Picklable (pickles as its arguments and regenerates the data set), so it can run in a
    :class:`segrl.rewards.computer.RewardComputer` worker process.
    """

    def __init__(
        self,
        name: str,
        size: int,
        seed: int,
        config: dict[str, Any] | None = None,
        *,
        partial_credit: bool = False,
        tag: str = "answer",
    ):
        self.name = name
        self.size = size
        self.seed = seed
        self.config = dict(config or {})
        self.partial_credit = partial_credit
        self.tag = tag
        self.__name__ = f"reasoning_gym_{name}"
        self._ds = None
        self._entries: dict[int, dict] = {}

    def _dataset(self):
        if self._ds is None:
            rg = _import_rg()
            self._ds = rg.create_dataset(self.name, size=self.size, seed=self.seed, **self.config)
        return self._ds

    def entry(self, index: int) -> dict:
        if index not in self._entries:
            self._entries[index] = self._dataset()[index]
        return self._entries[index]

    def score(self, completion: Any, answer: Any = None, rg_index: Any = None) -> float:
        """Score one completion."""
        pred = extract_tagged_answer(completion_text(completion), self.tag)
        if rg_index is not None:
            entry = self.entry(int(rg_index))
        else:
            entry = {"question": "", "answer": "" if answer is None else str(answer), "metadata": {}}
        try:
            s = float(self._dataset().score_answer(pred, entry))
        except Exception:  # noqa: BLE001 - a verifier crash is a wrong answer
            logger.debug("reasoning-gym %s score_answer failed", self.name, exc_info=True)
            return 0.0
        if self.partial_credit:
            return s
        return 1.0 if s >= 1.0 else 0.0

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        answer: Sequence[Any] | None = None,
        rg_index: Sequence[Any] | None = None,
        **kw: Any,
    ) -> list[float]:
        n = len(completions)
        answers = list(answer) if answer is not None else [None] * n
        idx = list(rg_index) if rg_index is not None else [None] * n
        return [self.score(c, a, i) for c, a, i in zip(completions, answers, idx)]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        return state

    def __repr__(self) -> str:
        return f"ReasoningGymScorer({self.name!r}, size={self.size}, seed={self.seed})"


def reasoning_gym_task(
    name: str,
    size: int = 500,
    seed: int = 0,
    *,
    config: dict[str, Any] | None = None,
    template: str = RG_TEMPLATE,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    partial_credit: bool = False,
) -> Task:
    """A :class:`~segrl.tasks.base.Task` from a reasoning-gym data set.

    Args:
        name: reasoning-gym data set name, e.g. ``"basic_arithmetic"``, ``"chain_sum"``.
        size: number of generated entries (train + test).
        seed: generation seed.
        config: extra keyword arguments for ``reasoning_gym.create_dataset`` (difficulty etc.).
        template: prompt template with ``{question}`` (default :data:`RG_TEMPLATE`).
        test_fraction, split_seed: see :func:`segrl.tasks.rows.split_rows`.
        partial_credit: keep reasoning-gym's fractional scores instead of 1.0/0.0.

    Raises ``ImportError`` with install instructions if reasoning-gym is not installed, and
    ``LookupError`` naming the closest names if it has no data set ``name``.
    """
    rg = _import_rg()
    _check_name(rg, name)
    ds = rg.create_dataset(name, size=size, seed=seed, **(config or {}))
    rows = []
    for i in range(len(ds)):
        entry = ds[i]
        rows.append(
            {
                "prompt": format_prompt(template, entry["question"]),
                "answer": "" if entry["answer"] is None else str(entry["answer"]),
                "id": f"{name}-{seed}-{i}",
                "question": entry["question"],
                "rg_index": i,
            }
        )
    train, test = split_rows(rows, test_fraction, split_seed)
    scorer = ReasoningGymScorer(name, size, seed, config, partial_credit=partial_credit)
    scorer._ds = ds
    return Task(
        name=f"reasoning_gym/{name}",
        train=train,
        test=test,
        correctness=scorer,
        stop_strings=RG_STOP_STRINGS,
    )
