"""Find the files of a model before transformers loads them, and say what is wrong in one line.

transformers reports a missing directory as an invalid repo id, an uncached model id as a
network failure and a directory without tokenizer files as a missing sentencepiece/tiktoken
install; :func:`locate_model` checks these cases first and raises
:class:`~segrl.errors.ModelLoadError` naming the path and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelLoadError

#: any of these makes a directory hold a tokenizer transformers can load
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
#: a Hugging Face model id: ``name`` or ``namespace/name``
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WHAT = "a local model directory, a segrl run directory, a preset (default, smollm2-135m) or a model id in the local Hugging Face cache"


def locate_model(path: str) -> str:
    """The directory (or, with the hub online, the model id) to load ``path`` from.

    ``path`` is what :func:`~segrl.models.loading.resolve_model_path` returned. A local
    directory must hold ``config.json``, safetensors weights and tokenizer files; a model id
    must be in the local Hugging Face cache when ``HF_HUB_OFFLINE=1`` (segrl's default)."""
    p = Path(path).expanduser()
    if p.is_dir():
        check_model_dir(p)
        return str(p)
    if p.exists():
        raise ModelLoadError(f"model.name_or_path={path} is a file; pass the directory holding config.json, the weights and the tokenizer")
    if not _REPO_ID.match(path) or path.startswith(("./", "../", "~")) or "/" in path and Path(path.split("/")[0]).is_dir():
        raise ModelLoadError(f"model.name_or_path={path}: no such directory (expected {_WHAT})")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
        return path  # the hub is allowed: transformers downloads (and reports its own errors)
    snapshot = _cached_snapshot(path)
    if snapshot is None:
        raise ModelLoadError(
            f"model.name_or_path={path}: not a local directory, a preset or a model id in the local Hugging Face cache "
            f"(segrl downloads nothing at run time, HF_HUB_OFFLINE=1); download it once with `hf download {path}` "
            "or pass a local directory"
        )
    check_model_dir(Path(snapshot), shown=path)
    return snapshot


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of ``repo_id`` in the Hugging Face cache, or ``None``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def check_model_dir(d: Path, shown: str | None = None) -> None:
    """Raise :class:`ModelLoadError` unless ``d`` holds a config, safetensors weights and a tokenizer."""
    name = shown or str(d)
    files = {f.name for f in d.iterdir()}
    if "config.json" not in files:
        if (d / "config.yaml").is_file():  # a segrl run directory (resolve_model_path takes its final_model/)
            ckpts = sorted(d.glob("checkpoints/step-*/model/config.json"))
            hint = f"; its newest checkpoint's model is {ckpts[-1].parent}" if ckpts else ""
            raise ModelLoadError(f"model.name_or_path={name} is a segrl run without final_model/ (not finished){hint}")
        raise ModelLoadError(f"model.name_or_path={name} has no config.json: not a Hugging Face model directory (expected {_WHAT})")
    if not any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
        if any(f.endswith((".bin", ".pt", ".pth")) or f == "pytorch_model.bin.index.json" for f in files):
            raise ModelLoadError(
                f"{name} holds PyTorch .bin weights but no safetensors, and segrl loads safetensors only (unpickling can run code); "
                f"for a model you trust, convert it once: python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{d}', use_safetensors=False).save_pretrained('{d}')\""
            )
        raise ModelLoadError(f"{name} has no model weights (*.safetensors)")
    if not files.intersection(TOKENIZER_FILES):
        raise ModelLoadError(
            f"{name} has no tokenizer files (tokenizer.json, tokenizer_config.json); save the model's tokenizer there: "
            f"AutoTokenizer.from_pretrained(SOURCE).save_pretrained('{d}')"
        )
