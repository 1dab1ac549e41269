"""Load a policy model and tokenizer: the embedded default, a preset, or a local directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: name -> callable returning a local directory (presets that convert or unpack on first use)
PRESETS: dict[str, callable] = {}


def register_preset(name: str):
    def deco(fn):
        PRESETS[name] = fn
        return fn

    return deco


def resolve_model_path(name_or_path: str) -> str:
    """'default' -> the shipped model; a preset -> its cached directory; else as given."""
    if name_or_path == "default":
        from .default import default_model_path

        return str(default_model_path())
    if name_or_path in PRESETS:
        return str(PRESETS[name_or_path]())
    return name_or_path


def load_model_and_tokenizer(cfg):
    """Load ``(model, tokenizer)`` from a :class:`~segrl.configs.ModelConfig`.

    Weights load from safetensors only (``use_safetensors=True``), ``trust_remote_code`` is
    off unless the config turns it on, and nothing is fetched from a hub unless the path
    is a model id already cached locally (``HF_HUB_OFFLINE=1`` is honoured).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    local = Path(path).is_dir()
    kw = dict(trust_remote_code=cfg.trust_remote_code, local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1")
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], use_safetensors=True, **kw)
    model.to(cfg.device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tok
