"""Load a policy model and tokenizer: the embedded default, a preset, or any causal LM.

``model.name_or_path`` may be

* ``default``: the embedded tiny LLaMA (character tokenizer, no download);
* a preset name (``smollm2-135m``, see :mod:`segrl.models.presets`): converted once into a
  local cache directory;
* a local directory holding a Hugging Face causal LM (``config.json``, safetensors weights,
  tokenizer files), e.g. your own ``huggingface-cli download`` or ``save_pretrained`` output;
* a segrl run directory: its ``final_model/``;
* a model id already in the local Hugging Face cache (nothing is downloaded when
  ``HF_HUB_OFFLINE=1``).

Weights load from safetensors only, ``trust_remote_code`` is off unless asked for. What is
missing (directory, cache entry, weights, tokenizer, CUDA) is a one-line
:class:`~segrl.errors.ModelLoadError` / :class:`~segrl.errors.DeviceError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DeviceError, ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: name -> callable returning a local directory (presets that convert or unpack on first use)
PRESETS: dict[str, callable] = {}


def register_preset(name: str):
    def deco(fn):
        PRESETS[name] = fn
        return fn

    return deco


def _load_builtin_presets() -> None:
    from . import presets  # noqa: F401  (registers smollm2-135m)


def resolve_model_path(name_or_path: str) -> str:
    """'default' -> the shipped model; a preset -> its cached directory; a segrl run directory
    -> its ``final_model/``; else as given."""
    if name_or_path == "default":
        from .default import default_model_path

        return str(default_model_path())
    if name_or_path not in PRESETS:
        _load_builtin_presets()
    if name_or_path in PRESETS:
        return str(PRESETS[name_or_path]())
    run_model = Path(name_or_path).expanduser() / "final_model"
    if (run_model / "config.json").is_file() and not (Path(name_or_path).expanduser() / "config.json").exists():
        return str(run_model)
    return name_or_path


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given, once
    :func:`check_device` has found it usable."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def check_device(device: str) -> None:
    """Raise :class:`~segrl.errors.DeviceError` (one line, with the fix) for a device this torch
    build or machine cannot use: CUDA on a CPU-only build, or a GPU index that is not there."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"model.device={device!r} is not a torch device (cpu, cuda, cuda:N or auto)") from None
    if dev.type != "cuda":
        return
    if torch.version.cuda is None:
        raise DeviceError(
            f"model.device={device}: this torch build ({torch.__version__}) has no CUDA; install a CUDA build of torch "
            "(the pip command for your CUDA version is on the PyTorch 'Get Started' page) or use --model.device cpu"
        )
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise DeviceError(
            f"model.device={device}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; is the driver loaded?); use --model.device cpu"
        )
    if dev.index is not None and dev.index >= n:
        raise DeviceError(f"model.device={device}: only {n} GPU(s) visible (cuda:0 .. cuda:{n - 1})")


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on a GPU that supports it, float32 otherwise (bf16 matmuls on CPU
    are much slower than fp32 ones)."""
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def setup_tokenizer(tok, model=None, chat_template: str = "auto"):
    """Pad/EOS handling and the chat-template choice, shared by every loader.

    * no pad token -> the EOS token pads (pads are masked out everywhere, so this is safe);
    * padding on the left (the engine's batching convention);
    * ``model.generation_config.eos_token_id`` (the ids that end generation) is filled in from
      the tokenizer when the model has none;
    * ``tok.segrl_chat_template`` records whether plain-text prompts are wrapped as a user
      message with the tokenizer's chat template (``auto``: when it has one; ``on``; ``off``).
      Conversational prompts (lists of ``{"role", "content"}``) always use the template.
    """
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if model is not None:
        gc = getattr(model, "generation_config", None)
        if gc is not None and gc.eos_token_id is None and tok.eos_token_id is not None:
            gc.eos_token_id = tok.eos_token_id
        if gc is not None and gc.pad_token_id is None:
            gc.pad_token_id = tok.pad_token_id
    has = bool(getattr(tok, "chat_template", None))
    if chat_template == "on" and not has:
        raise ModelLoadError(f"model.chat_template=on but the tokenizer of {tok.name_or_path} has no chat template; use auto or off")
    tok.segrl_chat_template = has if chat_template == "auto" else chat_template == "on"
    return tok


def encode_prompt(tokenizer, prompt: Any) -> list[int]:
    """Token ids of one prompt: a string (wrapped in the chat template when the tokenizer was
    set up for it, else tokenized as is with the tokenizer's special tokens) or a list of
    chat messages (always through the chat template, with the generation prompt)."""
    if isinstance(prompt, str) and not getattr(tokenizer, "segrl_chat_template", False):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"conversational prompts (lists of role/content messages) need a chat template, and the tokenizer of "
            f"{tokenizer.name_or_path} has none: use plain-text prompts, a chat (instruct) model, or set tokenizer.chat_template"
        )
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def load_model_and_tokenizer(cfg):
    """Load ``(model, tokenizer)`` from a :class:`~segrl.configs.ModelConfig`.

    Weights load from safetensors only (``use_safetensors=True``), ``trust_remote_code`` is
    off unless the config turns it on, and nothing is fetched from a hub unless the path
    is a model id already cached locally (``HF_HUB_OFFLINE=1`` is honoured). ``auto`` device
    and dtype are resolved here and written back into ``cfg`` (so the rest of the run sees
    concrete values).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .locate import locate_model

    cfg.device = resolve_device(cfg.device)
    cfg.dtype = resolve_dtype(cfg.dtype, cfg.device)
    path = locate_model(resolve_model_path(cfg.name_or_path))
    local = Path(path).is_dir()
    kw = dict(trust_remote_code=cfg.trust_remote_code, local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1")
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], use_safetensors=True, **kw)
    except (OSError, ValueError) as e:  # files present (checked above) but not loadable: transformers says why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load the model at {path}: {first}") from e
    model.to(cfg.device)
    setup_tokenizer(tok, model, getattr(cfg, "chat_template", "auto"))
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tok
