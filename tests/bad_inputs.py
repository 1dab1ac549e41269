"""Bad inputs for ``segrl train``: each case is the extra arguments and what the one-line error
must name. Used by ``test_bad_input.py`` (and the attack rerun recorded in docs/reliability.md).

``make_inputs(root)`` writes the files; ``CASES`` maps a case id to ``(args, named)`` where
``args`` uses ``{D}`` for that directory and ``named`` is a string the error must contain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GOOD = [{"prompt": f"Q: {a}+{b} =\nA:", "answer": str(a + b)} for a in range(1, 6) for b in range(1, 4)]


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_inputs(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _jsonl(d / "good.jsonl", GOOD)
    (d / "nonutf8.jsonl").write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in GOOD[:3]) + b'{"prompt": "caf\xe9 =", "answer": "1"}\n'
    )
    (d / "nested.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + "[" * 100_000 + "\n")
    _jsonl(d / "one.jsonl", GOOD[:1])
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n\n  \n")
    (d / "data.csv").write_text("prompt,answer\n1+1,2\n")
    _jsonl(d / "wrongcols.jsonl", [{"question": "1+1", "solution": "2"}] * 5)
    (d / "adir").mkdir(exist_ok=True)
    (d / "dir.jsonl").mkdir(exist_ok=True)
    (d / "binary.json").write_bytes(bytes(range(256)) * 4)
    (d / "nested.json").write_text("[" * 100_000)
    (d / "scalar.json").write_text("5")
    (d / "garbage.parquet").write_bytes(b"PAR1 not a parquet file")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "list.yaml").write_text("- train\n- data\n")
    (d / "nested.yaml").write_text("[" * 100_000)
    (d / "unterminated.yaml").write_text("train: [\n")
    (d / "typo.yaml").write_text("train:\n  learnig_rate: 0.1\n")
    (d / "syntax_rewards.py").write_text("def f(:\n")
    (d / "exit_rewards.py").write_text("import sys\nsys.exit(0)\n")
    if not (d / "zero.jsonl").is_symlink():
        os.symlink("/dev/zero", d / "zero.jsonl")
    if not (d / "fifo.jsonl").exists():
        os.mkfifo(d / "fifo.jsonl")  # reading it would wait forever for a writer
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{"q": "1+1", "a": "2"}] * 5), d / "wrongcols.parquet")
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        pass
    return d


def _file(name: str) -> list[str]:
    return ["--data.task", "file", "--data.train_file", f"{{D}}/{name}"]


#: the cases the audit listed (issue 22 item 7), run as real ``python -m segrl.cli`` processes
LISTED = {
    "non-utf8-byte": (_file("nonutf8.jsonl"), "nonutf8.jsonl: row 4: not UTF-8"),
    "100k-nested-brackets": (_file("nested.jsonl"), "nested.jsonl: row 2: invalid JSON (nested too deeply"),
    "one-row-file": (_file("one.jsonl"), "one.jsonl: 1 usable row(s)"),
    "binary-yaml-config": (["--config", "{D}/binary.yaml"], "binary.yaml': not UTF-8 text"),
    "reasoning-gym-nosuch": (["--data.task", "reasoning_gym:nosuch"], "data.task: 'reasoning_gym:nosuch'"),
    "seed-out-of-range": (["--train.seed", "1180591620717411303424"], "train.seed: must be in [0, 2**32 - 1]"),
}

#: more of the same families, found by trying
MORE = {
    "empty-file": (_file("empty.jsonl"), "empty.jsonl: no usable rows"),
    "blank-lines-only": (_file("blank.jsonl"), "blank.jsonl: no usable rows"),
    "csv-file": (_file("data.csv"), "data.csv: unsupported file type '.csv'"),
    "jsonl-wrong-columns": (_file("wrongcols.jsonl"), "wrongcols.jsonl: row 1: missing 'prompt' (the row has 'question', 'solution'"),
    "parquet-wrong-columns": (_file("wrongcols.parquet"), "wrongcols.parquet: row 1: missing 'prompt' (the row has 'q', 'a'"),
    "gsm8k-wrong-columns": (
        ["--data.task", "gsm8k", "--data.train_file", "{D}/wrongcols.jsonl"],
        "wrongcols.jsonl: row 1: missing 'answer'",
    ),
    "directory-as-file": (_file("adir"), "adir: is a directory"),
    "directory-named-jsonl": (_file("dir.jsonl"), "dir.jsonl: is a directory"),
    "device-as-file": (_file("zero.jsonl"), "zero.jsonl: not a regular file"),
    "fifo-as-file": (_file("fifo.jsonl"), "fifo.jsonl: not a regular file"),
    "binary-json": (_file("binary.json"), "binary.json: not UTF-8"),
    "nested-json": (_file("nested.json"), "nested.json: invalid JSON (nested too deeply"),
    "json-scalar": (_file("scalar.json"), "scalar.json: expected a JSON array"),
    "corrupt-parquet": (_file("garbage.parquet"), "garbage.parquet: cannot read parquet file"),
    "empty-test-file": (_file("good.jsonl") + ["--data.test_file", "{D}/empty.jsonl"], "empty.jsonl: no usable rows"),
    "missing-file": (_file("nope.jsonl"), "nope.jsonl"),
    "file-task-without-file": (["--data.task", "file"], "data.train_file"),
    "yaml-list": (["--config", "{D}/list.yaml"], "list.yaml' must hold a mapping"),
    "yaml-nested": (["--config", "{D}/nested.yaml"], "nested.yaml' is not valid YAML (nested too deeply)"),
    "yaml-unterminated": (["--config", "{D}/unterminated.yaml"], "unterminated.yaml' is not valid YAML"),
    "yaml-directory": (["--config", "{D}/adir"], "adir' is a directory"),
    "yaml-device": (["--config", "/dev/zero"], "'/dev/zero' is not a regular file"),
    "yaml-unknown-key": (["--config", "{D}/typo.yaml"], "'train.learnig_rate' (did you mean 'train.learning_rate'?)"),
    "cli-unknown-key": (["--train.learnig_rate", "0.1"], "'train.learnig_rate' (did you mean 'train.learning_rate'?)"),
    "cli-unknown-section": (["--trian.seed", "1"], "'trian' (did you mean 'train'?)"),
    "seed-negative": (["--train.seed", "-1"], "train.seed: must be in [0, 2**32 - 1]"),
    "seed-just-over": (["--train.seed", "4294967296"], "train.seed: must be in [0, 2**32 - 1]"),
    "reasoning-gym-no-name": (["--data.task", "reasoning_gym:"], "'reasoning_gym:' names no data set"),
    "unknown-task": (["--data.task", "nosuch"], "data.task: unknown task 'nosuch'"),
    "reward-file-missing": (["--data.reward_funcs", "{D}/nope.py:f"], "nope.py:f"),
    "reward-file-syntax-error": (["--data.reward_funcs", "{D}/syntax_rewards.py:f"], "syntax_rewards.py:f': SyntaxError"),
    "reward-file-sys-exit": (["--data.reward_funcs", "{D}/exit_rewards.py:f"], "exit_rewards.py called sys.exit(0)"),
    "reward-spec-malformed": (["--data.reward_funcs", "nocolon"], "'nocolon'"),
    "negative-reward-memory": (["--data.reward_memory_mb", "-1"], "data.reward_memory_mb: must be >= 0"),
}

CASES = {**LISTED, **MORE}


def case_args(case: str, d: Path) -> tuple[list[str], str]:
    args, named = CASES[case]
    return [a.replace("{D}", str(d)) for a in args], named
