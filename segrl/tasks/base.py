"""What a task is: rows of prompts with gold answers, and how to grade a completion.

Reward functions follow TRL's contract: ``f(prompts, completions, **columns) -> list[float | None]``
where ``columns`` holds every other dataset column as a list aligned with ``prompts``
(e.g. ``answer``). ``None`` means "no reward for this sample" (ignored in the weighted sum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFunc = Callable[..., list]


@dataclass
class Task:
    """A train/test set of prompt rows plus the grader that defines correctness.

    Every row is a dict with at least ``prompt`` (text given to the model, already formatted)
    and ``answer`` (gold final answer as text). ``correctness`` returns 1.0 for a correct and
    0.0 for a wrong completion; it is the default reward and what evaluation reports.
    """

    name: str
    train: Sequence[dict[str, Any]]
    test: Sequence[dict[str, Any]]
    correctness: RewardFunc
    stop_strings: tuple[str, ...] = ()
    extra_reward_funcs: list[RewardFunc] = field(default_factory=list)
    #: final-answer extractor used for majority voting (maj@k); None = the last line
    extract_answer: Callable[[str], str | None] | None = None
