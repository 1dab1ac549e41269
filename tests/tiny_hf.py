"""A tiny Hugging Face causal LM saved to a local directory, like a user's own download.

Random LLaMA weights (2 layers, hidden 64) plus a real ``tokenizers`` tokenizer (one token per
character) with a ChatML chat template, ``<|im_end|>`` as EOS and no pad token (the loader
must fall back to EOS). Built in well under a second; used by the scale-out tests.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = " \n" + string.digits + "+-*=:.,?!()" + string.ascii_letters
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHATML
    return hf


def build_tiny_model(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_hf(path: str | Path, seed: int = 0, **model_kw) -> Path:
    """Write a tiny causal LM (safetensors + tokenizer with chat template) to ``path``."""
    path = Path(path)
    tok = build_tokenizer()
    model = build_tiny_model(len(tok), seed, **model_kw)
    model.generation_config.eos_token_id = None  # the loader fills it in from the tokenizer
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
