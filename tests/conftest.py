"""Shared fixtures: a tiny random LLaMA and a tokenizer stand-in (fast, no download)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(2)


class CharTok:
    """Minimal tokenizer stand-in: token i decodes to chr(65 + i); 1 is EOS, 0 is pad."""

    eos_token_id = 1
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + int(i)) for i in ids if not (skip_special_tokens and i in (0, 1)))


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def char_tok():
    return CharTok()
