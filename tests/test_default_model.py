import json

import pytest
import torch
from transformers import LlamaForCausalLM

from segrl.models.default import default_model_path, load_default
from segrl.models.tokenizer import build_tokenizer
from segrl.tasks.arithmetic import extract_answer, make_arithmetic_task, solution


@pytest.fixture(scope="module")
def loaded():
    return load_default()


def test_assets_present_and_small():
    path = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) < 15 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_loads_offline(loaded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = loaded
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    n = sum(p.numel() for p in model.parameters())
    assert 500_000 <= n <= 3_000_000
    assert model.config.vocab_size == len(tok)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_tokenizer_round_trip(loaded):
    _, tok = loaded
    row = make_arithmetic_task(n_train=1, n_test=1).test[0]
    text = row["prompt"] + solution(row)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character, plus <bos>
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:]) == text
    assert tok("A:\n 1")["input_ids"][1:] == tok.convert_tokens_to_ids(["A", ":", "\n", " ", "1"])
    # The shipped tokenizer is the one build_tokenizer() makes.
    assert build_tokenizer()(text)["input_ids"] == ids


def test_greedy_writes_the_format(loaded):
    model, tok = loaded
    torch.manual_seed(0)
    rows = make_arithmetic_task(n_train=1, n_test=8).test
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model decodes fastest on one thread (much faster on a busy CPU)
    try:
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=48)
    finally:
        torch.set_num_threads(n_threads)
    n_formed = 0
    for seq in out[:, enc["input_ids"].shape[1]:]:
        ids = seq.tolist()
        assert tok.eos_token_id in ids, tok.decode(ids)  # it stops by itself
        text = tok.decode(ids[: ids.index(tok.eos_token_id)])
        lines = text.split("\n")
        n_formed += extract_answer(text) is not None and lines[-1].startswith("answer: ") and text.endswith(".")
    assert n_formed >= 7
