"""What a run shows and leaves behind: the progress bar; ``final_model/``, ``summary.json``,
``report.html`` + ``trees.html``, and the closing lines saying where they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .faults import maybe_kill
from .run_dir import DiskFullError, apply_umask, disk_full


def save_final_model(run_dir: Path, model, tokenizer, step: int) -> Path:
    """``RUN/final_model`` (safetensors + tokenizer), written to a temporary name and renamed;
    a failed write (a full disk) removes the temporary copy."""
    maybe_kill("before_final_model", step)
    final, tmp = run_dir / "final_model", run_dir / ".tmp-final_model"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
    except Exception as e:
        full = disk_full(e, run_dir, final)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            msg = f"{full}; removed the partial copy (the last checkpoint is intact: free space, then --resume {run_dir})"
            raise DiskFullError(msg) from None
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def write_report(run_dir: Path, tokenizer, console) -> bool:
    """``report.html`` + ``trees.html`` (:mod:`segrl.report`); a failure is only a warning."""
    try:
        from ..report import build_report

        build_report(run_dir, tokenizer=tokenizer)
        return True
    except Exception as e:  # noqa: BLE001 - a report must never fail a finished run
        console.print(f"[yellow]warning: report.html not written: {type(e).__name__}: {e}[/yellow]")
        return False


def print_where(console, run_dir: Path) -> None:
    """The closing lines of a run: where its results are."""
    lines = [f"run directory: {run_dir}"]
    for label, name in (("report", "report.html"), ("final model", "final_model"), ("metrics", "metrics.jsonl")):
        if (run_dir / name).exists():
            lines.append(f"  {label}: {run_dir / name}")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


class ProgressBar:
    """A rich progress bar over the steps, or over the generated tokens under a token budget
    (the step count is then open); inert when ``enabled`` is false."""

    def __init__(self, tr, enabled: bool):
        t = tr.cfg.train
        self.tr, self.algo, self.bar = tr, t.algo, None
        self.by_tokens = t.max_generated_tokens > 0
        self.total = t.max_generated_tokens if self.by_tokens else t.max_steps
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.bar = Progress(*columns, TextColumn("ETA"), TimeRemainingColumn(), console=tr.console)
            self.task = self.bar.add_task(self.algo, total=self.total, completed=self._done())

    def _done(self) -> int:
        return min(self.tr.generated_tokens, self.total) if self.by_tokens else self.tr.step

    def update(self, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self._done(), description=f"{self.algo} reward={metrics['reward']:.3f}")

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
