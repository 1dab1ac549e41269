"""The embedded default model: a tiny character-level LLaMA shipped inside the package.

It is warm-started on the arithmetic task (:mod:`segrl.tasks.arithmetic`) and loads offline;
rebuild it with ``segrl build-default-model --out segrl/models/assets/default``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase


def default_model_path() -> Path:
    """Folder of the shipped default model (``config.json``, ``model.safetensors``, tokenizer)."""
    return Path(__file__).resolve().parent / "assets" / "default"


def load_default(device: str = "cpu") -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of the shipped default model, in eval mode on ``device`` (fp32)."""
    path = default_model_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"default model not found at {path}; build it with "
            "`segrl build-default-model --out segrl/models/assets/default`"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(path), local_files_only=True)
    model.to(device)
    model.eval()
    return model, tok
