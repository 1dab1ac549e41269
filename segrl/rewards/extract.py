"""Final-answer extraction from completions and gold solutions (no grading, no processes).

* :func:`extract_gsm8k_answer`: GSM8K's ``#### <answer>`` convention.
* :func:`extract_boxed`: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced
  braces), or ``\\boxed 5``.
* :func:`extract_gsm8k_prediction`: lenient GSM8K answer extraction from a model completion.
* :func:`extract_final_answer`: generic extraction for user data sets.
* :func:`completion_text`: the text of a TRL completion (string or chat messages).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "completion_text",
    "extract_boxed",
    "extract_final_answer",
    "extract_gsm8k_answer",
    "extract_gsm8k_prediction",
]


def extract_gsm8k_answer(text: str | None) -> str | None:
    """The answer after the last ``####``: its first non-empty line, stripped, commas removed.

    ``"... #### 1,234"`` -> ``"1234"``. ``None`` when there is no ``####`` or nothing after it.
    """
    if not text or "####" not in text:
        return None
    rest = text.rsplit("####", 1)[1]
    for line in rest.splitlines():
        line = line.strip()
        if line:
            return line.replace(",", "")
    return None


_BOX_CMDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces handled, escaped
    ``\\{``/``\\}`` ignored), or the token after ``\\boxed 5``. ``None`` if there is none or the
    last one is unbalanced (e.g. a truncated completion)."""
    if not text:
        return None
    idx, cmd = -1, ""
    for c in _BOX_CMDS:
        k = text.rfind(c)
        if k > idx:
            idx, cmd = k, c
    if idx < 0:
        return None
    j = idx + len(cmd)
    k = j
    while k < len(text) and text[k] in " \t":
        k += 1
    if k < len(text) and text[k] == "{":
        depth = 0
        m = k
        while m < len(text):
            ch = text[m]
            if ch == "\\":
                m += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[k + 1 : m]
            m += 1
        return None
    if k > j:  # "\boxed 5"
        mt = re.match(r"[^\s$]+", text[k:])
        if mt:
            return mt.group(0).rstrip(".")
    return None


_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*\\?\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_gsm8k_prediction(text: str | None) -> str | None:
    """Lenient final-answer extraction for GSM8K-style completions, in this order:

    1. ``#### <answer>`` (:func:`extract_gsm8k_answer`);
    2. the last ``\\boxed{...}``;
    3. the last "answer is <number>";
    4. the last number in the text.

    Commas are removed from numbers. ``None`` if nothing is found.
    """
    if not text:
        return None
    a = extract_gsm8k_answer(text)
    if a:
        return a
    b = extract_boxed(text)
    if b:
        return b
    ms = _ANSWER_IS.findall(text)
    if ms:
        return ms[-1].replace(",", "")
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace(",", "")
    return None


def completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a conversational list of messages (the contents of
    the assistant messages are joined), or one message dict."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        c = completion.get("content", "")
        return c if isinstance(c, str) else str(c)
    if isinstance(completion, (list, tuple)):
        parts = []
        for m in completion:
            if isinstance(m, dict):
                if m.get("role", "assistant") == "assistant":
                    c = m.get("content", "")
                    parts.append(c if isinstance(c, str) else str(c))
            else:
                parts.append(str(m))
        return "\n".join(parts)
    return str(completion)


_ANSWER_LINE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)


def extract_final_answer(text: str | None) -> str | None:
    """Generic final-answer extraction, in this order: the last ``\\boxed{}``; ``#### X``; the
    rest of the last line containing "answer is X" / "answer: X" (trailing ``.`` and ``$``
    removed); the last number. ``None`` if nothing is found."""
    if not text:
        return None
    b = extract_boxed(text)
    if b is not None and b.strip():
        return b.strip()
    a = extract_gsm8k_answer(text)
    if a:
        return a
    ms = _ANSWER_LINE.findall(text)
    if ms:
        ans = ms[-1].strip().rstrip(".").strip().strip("$").strip()
        if ans:
            return ans
    nums = _NUMBER.findall(text)
    if nums:
        return nums[-1].replace(",", "")
    return None
