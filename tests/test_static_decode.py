"""The pool engine's ``flat`` layout and its bucketed static-shape steps (what CUDA graphs
replay): the same tokens and log-probs as the cascade layout and the unbucketed path, exact
against a full forward pass, only bucket shapes reach the model, other owners' pool rows
untouched; and the factory's choice of engine. CUDA-only: graph replay equals eager."""

from __future__ import annotations

import pytest
import torch
from test_engine import full_forward_logprobs
from test_treepo_sampler import TOK, make_cfg, prompts
from test_treepo_sampler import model as model  # noqa: F401  (module fixture)

from segrl.configs import SegrlConfig
from segrl.engine.base import SamplingParams
from segrl.engine.cascade_engine import CascadeEngine
from segrl.engine.cuda_graphs import bucket
from segrl.engine.hf_engine import Engine
from segrl.engine.registry import BACKENDS, kv_layout, make_engine


def test_buckets_by_hand():
    # base 8: 8, 12, 16, 24, 32, 48, 64, ... (no bucket more than a third padding)
    sizes = [bucket(n, 8) for n in (1, 8, 9, 12, 13, 17, 25, 33, 49, 100, 513)]
    assert sizes == [8, 8, 12, 12, 16, 24, 32, 48, 64, 128, 768]
    assert [bucket(n, 64) for n in (1, 64, 65, 97, 200, 300)] == [64, 64, 96, 128, 256, 384]


def grow(eng, prompts):
    """Forks at two depths, a chain, different prompt lengths, more rows than max_batch_size."""
    trees = eng.new_trees(prompts)
    lv1 = [c for kids in eng.extend([(t, 0) for t in trees], 6, 3) for c in kids]
    lv2 = [c for kids in eng.extend(lv1, 5, 2) for c in kids]
    eng.extend(lv2, 4, 1)
    return trees


def _shapes(eng):
    """Record (rows, positions) of every decode step the model runner sees."""
    seen = []
    fwd = eng._runner.forward

    def spy(inp, pos, tails, put, window, *a):
        seen.append((inp.shape[0], window[2]))
        return fwd(inp, pos, tails, put, window, *a)

    eng._runner.forward = spy
    return seen


@pytest.mark.parametrize("max_batch_size", [16, 100])
def test_static_shapes_sample_what_the_unbucketed_paths_sample(tiny_model, char_tok, max_batch_size):
    out, shapes = {}, {}
    kinds = [("cascade", {}), ("flat", {"layout": "flat", "static_shapes": False}), ("static", {"layout": "flat", "static_shapes": True})]
    for kind, kw in kinds:
        eng = CascadeEngine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=3, max_batch_size=max_batch_size, **kw)
        shapes[kind] = _shapes(eng)
        trees = grow(eng, [[2, 5, 6, 7], [2, 9, 9], [2, 3]] * 2)
        out[kind] = [[(n.token_ids, n.finish_reason, n.logprobs) for n in t.nodes] for t in trees]
    for t in trees:  # (the static kind's) exact against a full forward pass
        for leaf in t.leaves()[::5]:
            ref = full_forward_logprobs(tiny_model, t, leaf)
            assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)
    for kind in ("flat", "static"):
        for ta, tb in zip(out["cascade"], out[kind]):
            assert [(a, r) for a, r, _ in ta] == [(a, r) for a, r, _ in tb]  # same tokens, same ends
            for (_, _, la), (_, _, lb) in zip(ta, tb):
                assert la == pytest.approx(lb, abs=1e-5)
    assert {r for r, _ in shapes["static"]} <= {8, 12, 16, 24, 32, 48, 64, 96, 128}
    assert {t for _, t in shapes["static"]} == {64}
    assert len(set(shapes["flat"])) > len(set(shapes["static"]))  # the buckets: few shapes


def test_static_steps_leave_other_owners_rows_alone(tiny_model, char_tok):
    """Padding rows of the window write only the scratch row: states kept by other trees
    (whose pool rows lie inside the window) still continue exactly."""
    eng = CascadeEngine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=1, eos_token_ids=[], layout="flat", static_shapes=True)
    keep = eng.new_trees([[2, 4, 4], [2, 8]])
    held = [c for kids in eng.extend([(t, 0) for t in keep], 5, 2) for c in kids]  # states kept
    other = grow(eng, [[2, 5, 6, 7], [2, 9]])  # decodes over windows that include held rows
    eng.extend(held, 6, 1)
    for t in keep + other:
        for leaf in t.leaves():
            ref = full_forward_logprobs(tiny_model, t, leaf)
            assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)
    assert eng._static.scratch is None  # the scratch row is handed back after each call


def test_treepo_on_static_shapes_with_fallback_crops(model):  # noqa: F811
    """TreePO rounds and fallbacks (crops of finished leaves' tails) on the flat layout's
    static shapes: the same trees as on the cascade layout, exact log-probs."""
    from segrl.samplers.treepo import TreePOSampler

    cfg = make_cfg(max_len=24, segment_length=4, max_depth=3, width=10, initial_width=2, fallback_trajectory_policy="random_all")
    trees, crops = {}, {}
    for kind, kw in [("cascade", {}), ("static", {"layout": "flat", "static_shapes": True})]:
        eng = CascadeEngine(model, TOK, SamplingParams(temperature=1.0), seed=5, **kw)
        trees[kind] = eng.new_trees(prompts(4))
        TreePOSampler(cfg).grow(eng, trees[kind])
        crops[kind] = eng.stats.kv_crops
    assert crops["cascade"] == crops["static"] > 0
    for a, b in zip(trees["cascade"], trees["static"]):
        assert [n.token_ids for n in a.nodes] == [n.token_ids for n in b.nodes]
        for leaf in b.leaves():
            ref = full_forward_logprobs(model, b, leaf)
            assert torch.allclose(ref, torch.tensor(b.path_logprobs(leaf)), atol=2e-4)


def test_factory_picks_the_engine(tiny_model, char_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = SegrlConfig()
    assert kv_layout(cfg, tiny_model) == "cascade"  # auto on the CPU
    eng = make_engine(cfg, tiny_model, char_tok)
    assert type(eng) is CascadeEngine and eng.layout == "cascade" and eng._static is None
    cfg.sampling.kv_sharing = "flat"
    assert make_engine(cfg, tiny_model, char_tok).layout == "flat"
    cfg.sampling.kv_sharing = "copy"
    assert type(make_engine(cfg, tiny_model, char_tok)) is Engine
    cfg = SegrlConfig()
    cfg.treepo.kv_sharing = "copy"  # the old name still asks for the copy engine
    assert type(make_engine(cfg, tiny_model, char_tok)) is Engine
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert kv_layout(SegrlConfig(), gpt2) == "copy"
    cfg = SegrlConfig()
    cfg.sampling.backend = "nope"
    with pytest.raises(ValueError, match="unknown rollout backend 'nope'; known: hf, vllm"):
        make_engine(cfg, tiny_model, char_tok)


def test_evaluation_samples_on_the_configured_backend(tiny_model, char_tok, monkeypatch):
    """evaluate(cfg=...) builds its engine with the factory: a vllm run evaluates on vLLM
    (here a stand-in registered under that name)."""
    from segrl.tasks.arithmetic import make_arithmetic_task
    from segrl.trainer.evaluate import evaluate

    built = []

    def fake_vllm(cfg, model, tokenizer, params, max_batch_size, seed):
        built.append((params.temperature, max_batch_size, seed))
        return Engine(model, tokenizer, params, max_batch_size=max_batch_size, seed=seed)

    monkeypatch.setitem(BACKENDS, "vllm", fake_vllm)
    cfg = SegrlConfig()
    cfg.sampling.backend = "vllm"
    task = make_arithmetic_task(n_train=4, n_test=4, seed=0)
    members = {"eos_token_id": 1, "pad_token_id": 0, "decode": char_tok.decode, "__call__": lambda s, x, **k: {"input_ids": [2, 5]}}
    tok = type("T", (), members)()
    res = evaluate(tiny_model, tok, task, num_problems=2, k=2, max_new_tokens=4, temperature=0.7, seed=9, max_batch_size=64, cfg=cfg)
    assert built == [(0.7, 64, 9)] and res.num_problems == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(tiny_model, char_tok):
    gpu = tiny_model.to("cuda")
    try:
        out = {}
        for graphs in (False, True):
            params = SamplingParams(temperature=1.0)
            eng = CascadeEngine(gpu, char_tok, params, seed=3, max_batch_size=7, layout="flat", cuda_graphs=graphs)
            trees = grow(eng, [[2, 5, 6, 7], [2, 9, 9], [2, 3]] * 2)
            out[graphs] = [[(n.token_ids, n.logprobs) for n in t.nodes] for t in trees]
            assert (eng._static.captures > 0) == graphs and eng._static.graphs == graphs
        for ta, tb in zip(out[False], out[True]):
            assert [a for a, _ in ta] == [b for b, _ in tb]
            for (_, la), (_, lb) in zip(ta, tb):
                assert la == pytest.approx(lb, abs=1e-5)
    finally:
        tiny_model.to("cpu")
