"""One training run per method x seed, in this process, one after another.

Each run is a normal ``segrl train`` run directory (``config.yaml``, ``metrics.jsonl``,
``summary.json``, ``final_model/``) under ``OUT/<method>/seed<k>/``. A run that raises is
recorded as failed (``error.txt`` holds the traceback) and the comparison goes on.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .methods import METHODS


@dataclass
class RunResult:
    method: str
    seed: int
    run_dir: str
    status: str  # ok | failed | interrupted | reused
    error: str | None = None
    steps: int = 0
    generated_tokens: int = 0
    max_step_tokens: int = 0  # largest single step (the budget is overshot by less than this)
    elapsed_s: float = 0.0  # training wall-clock, evaluations excluded
    eval_s: float = 0.0
    wall_s: float = 0.0  # everything: model load, training, evaluations, saving
    before: float | None = None  # held-out pass@1
    final: float | None = None
    curve: list[dict] = field(default_factory=list)  # one point per held-out evaluation

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "reused") and self.final is not None


def run_overrides(method: str, seed: int, run_dir: Path, settings: dict[str, str]) -> dict[str, str]:
    """The config overrides of one run: comparison settings, then the method, then seed and
    directory (which must not be overridden)."""
    return {**settings, **METHODS[method][1], "train.seed": str(seed), "log.output_dir": str(run_dir)}


def read_run(run_dir: Path, res: RunResult) -> RunResult:
    """Fill ``res`` from a run directory's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    res.curve = [
        {"step": r["step"], "tokens": r.get("tokens/generated", 0.0), "elapsed_s": r.get("timing/elapsed_s", 0.0), "pass@1": r["eval/pass@1"]}
        for r in evals
    ]
    if steps:
        last = steps[-1]
        res.steps = int(last["step"])
        res.generated_tokens = int(last.get("tokens/generated", 0))
        res.max_step_tokens = int(max(r.get("tree/decoded_tokens", 0) for r in steps))
        res.elapsed_s = float(last.get("timing/elapsed_s", 0.0))
    if evals:
        res.before = evals[0]["eval/pass@1"] if evals[0]["step"] == 0 else None
        res.final = evals[-1]["eval/pass@1"]
        res.eval_s = float(evals[-1].get("timing/eval_s", 0.0))
        res.elapsed_s = max(res.elapsed_s, float(evals[-1].get("timing/elapsed_s", 0.0)))
    return res


def run_one(method: str, seed: int, run_dir: Path, settings: dict[str, str], console, reuse: bool = False) -> RunResult:
    """Train ``method`` with ``seed`` into ``run_dir``; never raises for a failed run."""
    from ..configs import load_config

    overrides = run_overrides(method, seed, run_dir, settings)
    stamp = run_dir / "compare_run.json"  # what this directory was run with (for --reuse)
    if reuse and (run_dir / "summary.json").exists() and stamp.exists():
        if json.loads(stamp.read_text()).get("overrides") == overrides:
            res = read_run(run_dir, RunResult(method, seed, str(run_dir), "reused"))
            res.wall_s = json.loads(stamp.read_text()).get("wall_s", 0.0)
            return res
    # a fresh start: metrics.jsonl is appended to, so an old run's lines must not remain
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    res = RunResult(method, seed, str(run_dir), "ok")
    t0 = time.perf_counter()
    try:
        from ..trainer.trainer import Trainer

        cfg = load_config(overrides=overrides)
        summary = Trainer(cfg, run_dir=run_dir, console=console).train()
        if "interrupted_at_step" in summary:
            res.status = "interrupted"
    except Exception as e:  # noqa: BLE001 - one method's failure must not stop the others
        res.status = "failed"
        msg = (str(e).strip().splitlines() or [""])[0]  # one line for the table; error.txt has it all
        res.error = f"{type(e).__name__}: {msg[:300]}".rstrip(": ")
        (run_dir / "error.txt").write_text(traceback.format_exc())
    res.wall_s = time.perf_counter() - t0
    read_run(run_dir, res)
    if res.status == "ok" and res.final is None:
        res.status, res.error = "failed", "no final evaluation in metrics.jsonl"
    if res.status != "ok":
        res.final = None  # its last evaluation is not the end of a full budget (the curve keeps it)
    stamp.write_text(json.dumps({"overrides": overrides, "wall_s": res.wall_s, "status": res.status}, indent=1))
    return res


def as_dict(res: RunResult) -> dict:
    return asdict(res)
