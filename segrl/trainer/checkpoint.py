"""Crash-safe checkpoints: written to a temporary directory, checksummed, renamed atomically.

Layout of ``RUN/checkpoints/step-000042/``:

* ``model/`` - ``save_pretrained`` (safetensors) + tokenizer, loadable by transformers;
* ``optimizer.pt``, ``scheduler.pt`` - torch state dicts (loaded with ``weights_only=True``);
* ``trainer_state.json`` - step, data position, RNG states, metrics so far;
* ``manifest.json`` - sha256 and size of every file above, written last.

A directory without a manifest, or whose files do not match it, is skipped with a message
and the previous checkpoint is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .faults import maybe_kill

MANIFEST = "manifest.json"
#: files every checkpoint must list in its manifest (besides the model's safetensors)
REQUIRED = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


class CheckpointError(RuntimeError):
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
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    maybe_kill("ckpt_model_written", step)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state))
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
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with open(tmp / MANIFEST, "rb") as f:
        os.fsync(f.fileno())
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


def load_training_state(path: Path, model, optimizer, scheduler) -> dict:
    """Load weights, optimizer and scheduler from a verified checkpoint; return trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are saved once; anything else missing is an error.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
