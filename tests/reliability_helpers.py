"""Helpers for the reliability tests: a tiny model on disk and small training runs.

Training runs use a tiny random LLaMA with the embedded character tokenizer (built once per
test session, ~1 s) and a user reward proportional to completion length, so that groups have
reward variance and every step really changes the weights (the random model never answers the
arithmetic task correctly).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LENGTH_REWARD = """
def length_reward(completions, **kw):
    return [len(c) / 16.0 for c in completions]
"""

_MODEL_CACHE: dict[str, Path] = {}


def tiny_model_dir(root: Path) -> Path:
    """A tiny random LLaMA + char tokenizer saved under ``root`` (cached per session)."""
    if "dir" in _MODEL_CACHE and _MODEL_CACHE["dir"].exists():
        return _MODEL_CACHE["dir"]
    from segrl.programs.build_default_model import ModelShape, make_model
    from segrl.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = make_model(len(tok), tok, ModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    out = Path(root) / "tiny-model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _MODEL_CACHE["dir"] = out
    return out


def reward_file(root: Path, text: str = LENGTH_REWARD, name: str = "rewards.py") -> Path:
    p = Path(root) / name
    p.write_text(text)
    return p


def train_args(model_dir: Path, out_dir: Path, *extra: str, steps: int = 6, reward: str | None = None) -> list[str]:
    """``segrl train`` arguments of a tiny run (about 0.05 s per step)."""
    args = [
        "train", "--threads", "1",
        "--model.name_or_path", str(model_dir),
        "--train.max_steps", str(steps),
        "--train.prompts_per_step", "2",
        "--train.num_generations", "4",
        "--sampling.max_completion_length", "16",
        "--eval.num_problems", "4",
        "--eval.num_samples", "1",
        "--data.num_train", "64",
        "--log.save_steps", "1",
        "--log.report_to", "none",
        "--log.progress", "false",
        "--log.output_dir", str(out_dir),
    ]
    if reward:
        args += ["--data.reward_funcs", reward]
    return args + list(extra)


def env(**extra: str) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("SEGRL_TEST_KILL_AT", None)
    e.update(extra)
    return e


def run_cli(args: list[str], timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``python -m segrl.cli ARGS`` in a subprocess; return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "segrl.cli", *args],
        env=env(**env_extra),
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def step_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl lines of training steps (not evaluations)."""
    return [m for m in read_metrics(run_dir) if "reward" in m]


#: metrics that measure wall time and legitimately differ between two runs
TIMING = ("step_time", "timing/")


def assert_metrics_equal(a: list[dict], b: list[dict], rel: float = 1e-6) -> None:
    assert len(a) == len(b), f"{len(a)} metric lines vs {len(b)}"
    for x, y in zip(a, b):
        keys = {k for k in x if not k.startswith(TIMING)}
        assert keys == {k for k in y if not k.startswith(TIMING)}, (x.get("step"), keys ^ set(y))
        for k in keys:
            u, v = x[k], y[k]
            if isinstance(u, float) and isinstance(v, float):
                assert math.isclose(u, v, rel_tol=rel, abs_tol=1e-9), (x["step"], k, u, v)
            else:
                assert u == v, (x["step"], k, u, v)


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process runs use one torch thread (as ``--threads 1``); restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
