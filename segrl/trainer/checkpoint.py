"""Crash-safe checkpoints: written to a temporary directory, checksummed, renamed atomically.

Layout of ``RUN/checkpoints/step-000042/``:

* ``model/`` - ``save_pretrained`` (safetensors) + tokenizer, loadable by transformers;
* ``optimizer.pt``, ``scheduler.pt`` - torch state dicts (loaded with ``weights_only=True``);
* ``trainer_state.json`` - step, data position, RNG states, metrics so far;
* ``manifest.json`` - sha256 and size of every file above, written last.

A directory without a manifest, or whose files do not match it, is skipped with a message
and the previous checkpoint is used; so is one whose files match their manifest but cannot be
read (:func:`read_checkpoint`: not JSON, not a safetensors/torch file, a pickle that is more
than tensors) or do not fit the model (:func:`apply_checkpoint` checks before it loads).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TrainingError
from .faults import maybe_kill
from .run_dir import DiskFullError, apply_umask, disk_full

MANIFEST = "manifest.json"
#: files every checkpoint must list in its manifest (besides the model's safetensors)
REQUIRED = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


class CheckpointError(TrainingError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``.

    A write that fails (a full disk, an I/O error) removes its temporary directory before the
    error goes up; on a full disk that is a :class:`DiskFullError` naming the device and the
    file. The previous checkpoints are untouched either way."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    writing = [tmp]  # what is being written (for the disk-full message)
    try:
        _write_files(tmp, step, model, tokenizer, optimizer, scheduler, state, writing)
    except BaseException as e:
        what = f"checkpoint {final} ({writing[-1].relative_to(tmp) if writing[-1] != tmp else 'directory'})"
        full = disk_full(e, ckpt_root, what) if isinstance(e, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFullError(f"{full}; freed the partial checkpoint") from None
        raise
    maybe_kill("ckpt_before_rename", step)
    old_same = None
    if final.exists():  # re-saving a step: move the old copy aside, never delete it first
        old_same = ckpt_root / f".old-step-{step:06d}-{os.getpid()}"
        os.replace(final, old_same)
    os.replace(tmp, final)  # atomic: readers see the old state or the complete new one
    _fsync_dir(ckpt_root)
    maybe_kill("ckpt_after_rename", step)
    if old_same is not None:
        shutil.rmtree(old_same, ignore_errors=True)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, writing: list[Path]) -> None:
    """Every file of a checkpoint into ``tmp``, fsynced, the manifest last."""
    tmp.mkdir()
    writing.append(tmp / "model")
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    maybe_kill("ckpt_model_written", step)
    writing.append(tmp / "optimizer.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    writing.append(tmp / "scheduler.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    writing.append(tmp / "trainer_state.json")
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    apply_umask(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "step": step,
        "time": time.time(),
        "files": {str(p.relative_to(tmp)): {"sha256": _sha256(p), "size": p.stat().st_size} for p in files},
    }
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    maybe_kill("ckpt_before_manifest", step)
    writing.append(tmp / MANIFEST)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with open(tmp / MANIFEST, "rb") as f:
        os.fsync(f.fileno())


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Completed checkpoint directories, oldest first (temporary ones excluded)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def remove_partial(ckpt_root: Path, log=print) -> list[Path]:
    """Delete temporary directories left by an interrupted :func:`save_checkpoint`."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    gone = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith((".tmp-step-", ".old-step-")))
    for p in gone:
        log(f"[segrl] removing partial checkpoint {p} (an interrupted write)")
        shutil.rmtree(p, ignore_errors=True)
    return gone


def move_aside_newer(ckpt_root: Path, keep: Path | None, log=print) -> None:
    """Rename every checkpoint newer than ``keep`` (all of them if None) to ``corrupt-step-N``."""
    root = Path(ckpt_root)
    for p in list_checkpoints(root):
        if keep is None or p.name > Path(keep).name:
            aside = root / f"corrupt-{p.name}"
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(p, aside)
            log(f"[yellow]moved corrupt checkpoint {p.name} to {aside}[/yellow]")


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the problem if ``path`` is not intact."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (partial write?)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {MANIFEST} is not valid JSON: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) and "size" in m and "sha256" in m for m in files.values()):
        raise CheckpointError(f"{path}: {MANIFEST} has no valid 'files' table")
    for rel in REQUIRED:
        if rel not in files:
            raise CheckpointError(f"{path}: {MANIFEST} does not list {rel}")
    if not any(rel.startswith("model/") and rel.endswith(".safetensors") for rel in files):
        raise CheckpointError(f"{path}: {MANIFEST} lists no model/*.safetensors weights")
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"{path}: file {rel} is missing")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: file {rel} has size {p.stat().st_size}, manifest says {meta['size']}")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {rel} does not match its checksum")


def latest_valid_checkpoint(ckpt_root: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for p in reversed(list_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            log(f"[segrl] skipping corrupt checkpoint: {e}")
    return None


@dataclass
class CheckpointFiles:
    """A checkpoint read into memory (nothing applied to a model yet)."""

    path: Path
    weights: dict
    optimizer: dict
    scheduler: dict
    state: object  # the parsed trainer_state.json (checked by segrl.trainer.run_state.parse)


def read_checkpoint(path: Path) -> CheckpointFiles:
    """Read every file of a (verified) checkpoint; :class:`CheckpointError` naming the file
    that cannot be read. Pickles are refused (``weights_only=True``), never executed."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: trainer_state.json is not readable JSON ({type(e).__name__})") from None
    weights = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise CheckpointError(f"{path}: model/{f.name} is not a readable safetensors file ({_first_line(e)})") from None
    if not weights:
        raise CheckpointError(f"{path}: no model/*.safetensors weights")
    return CheckpointFiles(path, weights, _load_torch(path, "optimizer.pt"), _load_torch(path, "scheduler.pt"), state)


def _load_torch(path: Path, name: str) -> dict:
    try:
        obj = torch.load(path / name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported" in str(e):
            raise CheckpointError(f"{path}: {name} holds pickled objects other than tensors (refused: they could run code)") from None
        raise CheckpointError(f"{path}: {name} is not a torch state dict ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a truncated/garbage zip, an I/O error, ...
        raise CheckpointError(f"{path}: {name} is not a readable torch file ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {name} holds a {type(obj).__name__}, not a state dict")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


def apply_checkpoint(ck: CheckpointFiles, model, optimizer, scheduler) -> None:
    """Load weights, optimizer and scheduler state into the live objects. Everything is
    checked against them first, so a checkpoint that does not fit changes nothing."""
    _check_optimizer(ck, optimizer)
    if not isinstance(ck.scheduler.get("last_epoch"), int):
        raise CheckpointError(f"{ck.path}: scheduler.pt has no 'last_epoch'")
    peft = hasattr(model, "peft_config")
    own = _peft_state(model) if peft else model.state_dict()
    # Tied embeddings are saved once; anything else missing is an error.
    missing = [k for k in own if k not in ck.weights and not k.endswith("lm_head.weight")]
    unexpected = [k for k in ck.weights if k not in own]
    wrong = [k for k in ck.weights if k in own and tuple(own[k].shape) != tuple(ck.weights[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{ck.path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]})"
        )
    optimizer.load_state_dict(ck.optimizer)
    scheduler.load_state_dict(ck.scheduler)
    if peft:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, ck.weights)
    else:
        model.load_state_dict(ck.weights, strict=False)


def _peft_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def _check_optimizer(ck: CheckpointFiles, optimizer) -> None:
    sd = ck.optimizer
    groups = sd.get("param_groups")
    ok = isinstance(sd.get("state"), dict) and isinstance(groups, list) and len(groups) == len(optimizer.param_groups)
    ok = ok and all(isinstance(g, dict) and len(g.get("params", ())) == len(o["params"]) for g, o in zip(groups, optimizer.param_groups))
    ok = ok and all(isinstance(v, dict) for v in sd["state"].values())
    if not ok:
        raise CheckpointError(f"{ck.path}: optimizer.pt does not fit this optimizer (other parameter groups or sizes)")


def load_training_state(path: Path, model, optimizer, scheduler) -> dict:
    """Load weights, optimizer and scheduler from a verified checkpoint; return trainer state."""
    ck = read_checkpoint(path)
    apply_checkpoint(ck, model, optimizer, scheduler)
    return ck.state
