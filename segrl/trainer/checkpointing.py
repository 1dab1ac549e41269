"""Saving a run (:func:`save_run`) and continuing it (``segrl train --resume RUN``,
:func:`resume_run`): its settings, its checkpoint, and the checks made before anything in the
run directory is written. The checkpoint format itself is :mod:`segrl.trainer.checkpoint`.

* **What is a run**: a directory ``segrl train`` wrote (its lock file, checkpoints, or logs
  with a config.yaml). A missing directory, a typo, an empty or unrelated directory is refused.
* **Settings**: the resolved config stored in the newest checkpoint (``config.yaml`` only for
  a run that has no checkpoint yet or whose checkpoints predate stored configs). Options given
  with ``--resume`` may change only the fields in :data:`RESUMABLE`; anything else (algorithm,
  model, LoRA, seed, data, batch shape, ...) is refused naming the field.
* **Checkpoint**: the newest one that verifies against its manifest, reads, and fits the
  model; each skipped one gets one line and the next older one is tried.
* **Logs**: ``metrics.jsonl`` / ``rollouts.jsonl`` must hold at least what the checkpoint
  recorded; a deleted or shortened file is refused rather than resumed with rows missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from .. import distributed as segrl_dist
from ..configs import SegrlConfig, to_dict
from ..configs.loader import load
from ..errors import SegrlError
from . import checkpoint as ckpt
from . import run_state
from .errors import TrainingError
from .run_dir import RunDirError, is_run

#: config fields a resumed run may change; every other field must equal the checkpoint's.
#: The first group leaves the maths untouched; the second changes only how the same maths
#: is batched or timed (a resumed run then matches an uninterrupted one up to float rounding).
RESUMABLE = frozenset({
    "train.max_steps", "train.max_generated_tokens",
    "eval.eval_steps", "eval.eval_every_tokens", "eval.eval_after",
    "log.logging_steps", "log.report_to", "log.save_steps", "log.save_total_limit", "log.save_rollouts", "log.progress",
    "train.micro_batch_size", "train.max_tokens_per_micro_batch", "sampling.max_batch_size", "model.logprob_chunk_size",
    "model.device", "train.deterministic", "data.reward_timeout", "data.max_reward_error_fraction",
})


class ResumeError(RunDirError, SegrlError):
    """A resume that is refused (the message names the reason and the way out): a wrong
    command, so the CLI exits with status 2."""


def flatten(cfg: dict) -> dict:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}`` (sections of fields; a field's own
    value stays whole even when it is a mapping)."""
    return {f"{sec}.{k}": v for sec, fields in cfg.items() if isinstance(fields, dict) for k, v in fields.items()}


def check_compatible(saved: dict, cfg: SegrlConfig) -> None:
    """Refuse a resume whose settings differ from the run's outside :data:`RESUMABLE`."""
    # (both through JSON, as the checkpoint stored it: tuples become lists)
    old, new = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(to_dict(cfg))))
    bad = [k for k in new if k in old and old[k] != new[k] and k not in RESUMABLE and k != "log.output_dir"]
    if bad:
        what = "; ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise ResumeError(
            f"cannot change {', '.join(bad[:3])} when resuming ({what}); resume without "
            f"{'it' if len(bad) == 1 else 'them'}, or start a new run in another --log.output_dir"
        )


def check_is_run(run: Path) -> None:
    if not run.exists():
        raise ResumeError(f"--resume {run}: no such directory (give the directory of the run to continue)")
    if not run.is_dir():
        raise ResumeError(f"--resume {run}: not a directory")
    if not is_run(run):
        raise ResumeError(
            f"--resume {run}: not a segrl run directory (no checkpoints, no config.yaml written by segrl train); "
            f"to start a new run there use --log.output_dir {run}"
        )


def newest_state(run: Path) -> dict | None:
    """trainer_state.json of the newest checkpoint where it matches the manifest and holds the
    run's config (None if there is none): read-only and cheap (one small file is hashed)."""
    for p in reversed(ckpt.list_checkpoints(Path(run) / "checkpoints")):
        try:
            entry = json.loads((p / ckpt.MANIFEST).read_text())["files"]["trainer_state.json"]
            data = (p / "trainer_state.json").read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                continue
            st = json.loads(data)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(st, dict) and isinstance(st.get("config"), dict) and isinstance(st.get("step"), int):
            return st
    return None


def run_settings(run: Path) -> dict | None:
    """The run's own settings: its newest checkpoint's, else its config.yaml (None: neither)."""
    st = newest_state(run)
    if st is not None:
        return st["config"]
    import yaml

    try:
        data = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def resume_config(run: str | Path | None, config_file: str | None, overrides: dict[str, str]) -> SegrlConfig:
    """The config ``segrl train --resume RUN [--config F] [--section.field v ...]`` continues
    with: the run's own settings, changed only where :data:`RESUMABLE` allows. Reads only;
    raises :class:`ResumeError` or :class:`segrl.configs.ConfigError` with a one-line message."""
    if run is None:
        run = overrides.get("log.output_dir")
        if run is None:
            raise ResumeError("--resume needs the run directory (--resume RUN_DIR or --log.output_dir RUN_DIR)")
    run = Path(run)
    check_is_run(run)
    given = overrides.get("log.output_dir")
    if given is not None and Path(given).resolve() != run.resolve():
        raise ResumeError(f"--resume {run} and --log.output_dir {given} name different directories")
    saved = run_settings(run)
    if saved is None:
        if config_file is None:
            raise ResumeError(
                f"--resume {run}: the run's settings are lost (no checkpoint holds them and config.yaml is missing or unreadable); "
                "pass them with --config FILE"
            )
        saved = {}
    # (a deep copy: loading sets the overrides into the nested sections of its base)
    cfg = load(SegrlConfig, config_file, {**overrides, "log.output_dir": str(run)}, base=copy.deepcopy(saved))
    check_compatible(saved, cfg)
    st = newest_state(run)
    if st is not None:
        check_logs(run, st)
    return cfg


def check_logs(run: Path, st: dict) -> None:
    """Refuse to resume when metrics.jsonl / rollouts.jsonl lost lines the checkpoint counted."""
    logs = st.get("log_bytes")
    for name, size in (logs if isinstance(logs, dict) else {}).items():
        if name not in run_state.LOGS or not isinstance(size, int):
            continue
        p = run / name
        have = p.stat().st_size if p.exists() else 0
        if have < size:
            state = "is missing" if not p.exists() else f"has {have} bytes"
            raise ResumeError(
                f"{p} {state} but checkpoint step {st['step']} recorded {size} bytes: rows of steps up to {st['step']} "
                f"would be missing; put the file back, or start a new run in another --log.output_dir"
            )


def save_run(tr, extra: dict) -> Path | None:
    """Checkpoint trainer ``tr`` at its step (``extra``: e.g. the summary so far). Under
    torchrun rank 0 writes (the replicas are identical; FSDP2 first gathers the full weights
    on every rank) and the others wait."""
    if tr.dist.enabled:
        with segrl_dist.gathered_for_rollout(tr.policy):  # FSDP2: every rank gathers
            model = segrl_dist.export_view(tr.model, tr.policy)
            path = _write_checkpoint(tr, model, extra) if tr.dist.is_main else None
        segrl_dist.barrier()
    else:
        path = _write_checkpoint(tr, tr.model, extra)
    tr._saved_step = tr.step
    return path


def _write_checkpoint(tr, model, extra: dict) -> Path:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # never let a NaN/inf reach saved weights
        raise TrainingError(f"step {tr.step}: non-finite values in {bad[:3]}; not saving (the last checkpoint is intact)")
    state = run_state.capture(tr, extra)
    root = tr.run_dir / "checkpoints"
    return ckpt.save_checkpoint(root, tr.step, model, tr.tokenizer, tr.optimizer, tr.scheduler, state, keep=tr.cfg.log.save_total_limit)


def resume_run(tr, path: str | Path | None = None) -> dict:
    """Restore trainer ``tr`` from the newest checkpoint of its run that verifies, reads and
    fits (or from ``path``); ``{}`` when there is none (the run starts over). Refusals (not a
    run, other settings, logs missing lines) raise before anything is written."""
    if tr.dist.enabled and tr.dist.strategy == "fsdp":
        raise TrainingError(
            "resuming a multi-process FSDP2 run is not supported yet (its optimizer state is sharded); use distributed.strategy=ddp"
        )
    check_is_run(tr.run_dir)
    root, main, log = tr.run_dir / "checkpoints", tr.dist.is_main, tr.console.print
    candidates = [Path(path)] if path is not None else list(reversed(ckpt.list_checkpoints(root)))
    found = load_newest(tr, candidates, log)
    if path is not None and found is None:
        raise ckpt.CheckpointError(f"{path}: cannot be resumed from (see above)")
    if main and path is None:
        ckpt.remove_partial(root, log=log)
        # Checkpoints newer than the one we resume from are corrupt: moved out of the way (kept
        # for inspection) so that they are neither loaded nor pruned instead of good ones.
        ckpt.move_aside_newer(root, found[0] if found else None, log=log)
    st = found[1].raw if found else {}
    if main:  # logs written after the checkpoint are cut (all of them without one)
        for name in run_state.LOGS:
            truncate(tr.run_dir / name, st.get("log_bytes", {}).get(name, 0))
    if found is None:
        log("[yellow]no intact checkpoint found; starting from scratch[/yellow]")
    else:
        run_state.restore(tr, found[1])
        tr._saved_step = tr.step
        log(f"[green]resumed from {found[0]} (step {tr.step})[/green]")
    tr._write_config()  # the settings the run continues with
    return st


def truncate(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (lines written after a checkpoint are dropped)."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def load_newest(tr, candidates: list[Path], log) -> tuple[Path, run_state.ParsedState] | None:
    """Load the first of ``candidates`` (newest first) that verifies, reads and fits trainer
    ``tr``; every skipped one is reported in one line. Refusals (settings, logs) raise."""
    for p in candidates:
        try:
            ckpt.verify_checkpoint(p)
            files = ckpt.read_checkpoint(p)
            try:
                parsed = run_state.parse(files.state)
            except run_state.StateError as e:
                raise ckpt.CheckpointError(f"{p}: trainer_state.json: {e}") from None
            saved = parsed.raw.get("config")
            if isinstance(saved, dict):
                check_compatible(saved, tr.cfg)
            if tr.dist.is_main:
                check_logs(tr.run_dir, parsed.raw)
            ckpt.apply_checkpoint(files, tr.model, tr.optimizer, tr.scheduler)
            return p, parsed
        except ckpt.CheckpointError as e:
            log(f"[segrl] skipping corrupt checkpoint: {e}")
    return None
