"""An embedded, seeded, procedurally generated multi-step integer arithmetic task.

Needs no download: problems are generated from a seed, so the same ``seed`` and
``difficulty`` always give the same train and test rows.

Problem
    A left-to-right chain of ``n_steps`` integer operations, e.g. ``17+25-8``. Every step is an
    addition or a subtraction of an operand in ``1..max_operand``; with probability ``p_mul``
    the chain instead *starts* with a small multiplication ``a*b`` (``a, b`` in
    ``2..mul_max``), which counts as its first step. Multiplication only ever comes first, so
    reading left to right agrees with the usual operator precedence. Subtractions never take a
    running value below zero (all intermediate results are non-negative integers).

Format (chain of thought, one step per line, then a terminated answer line)::

    prompt:     "Q: 17+25-8 =\\nA:"
    completion: " 17+25=42\\n42-8=34\\nanswer: 34."

The answer line is ``answer: N.``; its final ``.`` is the task's stop string (nothing else in
the format contains a ``.``), so an engine can end generation right after the answer line.
Supervised targets also append the tokenizer's EOS after it so that a model stops on its own.
Grading is an exact match of the integer on the first line that starts with ``answer:``
(the terminating ``.`` may be present or already cut away by the engine).

At the default difficulty (2-3 steps, operands up to 99) a completion is at most 45
characters, i.e. at most 46 tokens with a character-level tokenizer counting the EOS.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from segrl.tasks.base import Task

PROMPT_TEMPLATE = "Q: {expr} =\nA:"
ANSWER_PREFIX = "answer:"
ANSWER_TERMINATOR = "."
STOP_STRINGS = (ANSWER_TERMINATOR,)

_PROMPT_RE = re.compile(r"^Q: (.+) =\nA:$")
_TOKEN_RE = re.compile(r"\d+|[+\-*]")
_INT_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Difficulty:
    """The difficulty knob of the arithmetic task.

    Attributes:
        min_steps: fewest operations in a problem (each one is a line of the chain of thought).
        max_steps: most operations in a problem; a problem's count is uniform in
            ``[min_steps, max_steps]`` and is reported in the row's ``difficulty`` column.
        max_operand: largest operand of an addition/subtraction (and the largest first number);
            99 means 1-2 digit numbers.
        p_mul: probability that the chain starts with a multiplication ``a*b``.
        mul_max: largest factor of that multiplication (factors are in ``2..mul_max``).
    """

    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 99
    p_mul: float = 0.25
    mul_max: int = 9

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0.0 <= self.p_mul <= 1.0:
            raise ValueError(f"p_mul must be in [0, 1], got {self.p_mul}")
        if self.p_mul > 0 and self.mul_max < 2:
            raise ValueError(f"mul_max must be >= 2 when p_mul > 0, got {self.mul_max}")


DEFAULT_DIFFICULTY = Difficulty()


def as_difficulty(difficulty: Difficulty | int | dict | None) -> Difficulty:
    """``None`` -> default; ``int`` k -> exactly k steps (other fields default); ``dict`` -> fields."""
    if difficulty is None:
        return DEFAULT_DIFFICULTY
    if isinstance(difficulty, Difficulty):
        return difficulty
    if isinstance(difficulty, bool):
        raise TypeError("difficulty must be a Difficulty, an int or a dict")
    if isinstance(difficulty, int):
        return Difficulty(min_steps=difficulty, max_steps=difficulty)
    if isinstance(difficulty, dict):
        return Difficulty(**difficulty)
    raise TypeError(f"difficulty must be a Difficulty, an int or a dict, got {type(difficulty).__name__}")


# --------------------------------------------------------------------------- generation


def _sample_expression(rng: random.Random, d: Difficulty) -> str:
    n_steps = rng.randint(d.min_steps, d.max_steps)
    if rng.random() < d.p_mul:
        a, b = rng.randint(2, d.mul_max), rng.randint(2, d.mul_max)
        parts, value, remaining = [str(a), "*", str(b)], a * b, n_steps - 1
    else:
        value = rng.randint(1, d.max_operand)
        parts, remaining = [str(value)], n_steps
    for _ in range(remaining):
        if value >= 1 and rng.random() < 0.5:
            x = rng.randint(1, min(d.max_operand, value))
            parts += ["-", str(x)]
            value -= x
        else:
            x = rng.randint(1, d.max_operand)
            parts += ["+", str(x)]
            value += x
    return "".join(parts)


def _steps(expr: str) -> list[tuple[int, str, int, int]]:
    """Evaluate ``expr`` left to right: a list of ``(left, op, right, result)``."""
    toks = _TOKEN_RE.findall(expr)
    if "".join(toks) != expr or len(toks) < 3 or len(toks) % 2 == 0:
        raise ValueError(f"not an arithmetic chain: {expr!r}")
    value = int(toks[0])
    out = []
    for op, rhs in zip(toks[1::2], toks[2::2]):
        r = int(rhs)
        new = value + r if op == "+" else value - r if op == "-" else value * r
        out.append((value, op, r, new))
        value = new
    return out


def expression_of(prompt: str) -> str:
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return m.group(1)


def make_row(expr: str, split: str, index: int, n_steps: int | None = None) -> dict[str, Any]:
    steps = _steps(expr)
    return {
        "prompt": PROMPT_TEMPLATE.format(expr=expr),
        "answer": str(steps[-1][3]),
        "id": f"arith-{split}-{index:06d}",
        "difficulty": len(steps) if n_steps is None else n_steps,
    }


def solution(row: dict[str, Any]) -> str:
    """The ideal chain-of-thought completion of ``row`` (without EOS), e.g.
    ``" 17+25=42\\n42-8=34\\nanswer: 34."``."""
    steps = _steps(expression_of(row["prompt"]))
    lines = [f"{a}{op}{b}={c}" for a, op, b, c in steps]
    lines.append(f"{ANSWER_PREFIX} {steps[-1][3]}{ANSWER_TERMINATOR}")
    return " " + "\n".join(lines)


def _generate(rng: random.Random, n: int, d: Difficulty, exclude: set[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    attempts, max_attempts = 0, 50 * n + 1000
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct problems at {d}; lower n or raise the difficulty")
        expr = _sample_expression(rng, d)
        if expr in seen or expr in exclude:
            continue
        seen.add(expr)
        out.append(expr)
    return out


def make_arithmetic_task(
    n_train: int = 20000,
    n_test: int = 500,
    seed: int = 0,
    difficulty: Difficulty | int | dict | None = None,
) -> Task:
    """Build the arithmetic task: ``n_train`` train and ``n_test`` test rows, disjoint, from ``seed``.

    The test split is drawn from its own stream (it depends only on ``seed``, ``n_test`` and
    ``difficulty``, not on ``n_train``); train rows are then drawn excluding every test prompt.
    Rows are ``{"prompt", "answer", "id", "difficulty"}`` with ``difficulty`` the step count.
    """
    d = as_difficulty(difficulty)
    test_exprs = _generate(random.Random(f"arith-test-{seed}"), n_test, d, set())
    train_exprs = _generate(random.Random(f"arith-train-{seed}"), n_train, d, set(test_exprs))
    test = [make_row(e, "test", i) for i, e in enumerate(test_exprs)]
    train = [make_row(e, "train", i) for i, e in enumerate(train_exprs)]
    return Task(
        name="arithmetic",
        train=train,
        test=test,
        correctness=arithmetic_correctness,
        stop_strings=STOP_STRINGS,
    )


# --------------------------------------------------------------------------- grading


def extract_answer(completion: str) -> str | None:
    """The integer on the first line that starts with ``answer:``, or ``None`` if malformed.

    The rest of that line must be exactly an integer, optionally followed by the terminating
    ``.`` (so ``"answer: 34."`` and ``"answer: 34"`` give ``"34"``; ``"answer: 34 or 35"``
    gives ``None``). Anything after the answer line is ignored.
    """
    for line in completion.split("\n"):
        s = line.strip()
        if not s.startswith(ANSWER_PREFIX):
            continue
        rest = s[len(ANSWER_PREFIX):].strip()
        if rest.endswith(ANSWER_TERMINATOR):
            rest = rest[: -len(ANSWER_TERMINATOR)].rstrip()
        if not _INT_RE.fullmatch(rest):
            return None
        return str(int(rest))
    return None


def arithmetic_correctness(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL-style reward: 1.0 if the completion's answer equals the gold ``answer``, else 0.0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        if not isinstance(completion, str):  # conversational format: last message's content
            completion = completion[-1]["content"] if completion else ""
        got = extract_answer(completion)
        out.append(1.0 if got is not None and got == str(int(gold)) else 0.0)
    return out


def difficulty_dict(difficulty: Difficulty | int | dict | None = None) -> dict[str, Any]:
    return asdict(as_difficulty(difficulty))
