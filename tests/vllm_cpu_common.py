"""Helpers shared by tests/test_vllm_cpu.py and its HF-engine subprocess (no vllm import)."""

from segrl.models.loading import encode_prompt

PROMPTS = ["What is 2+2?", "Say hi", "Count: 1, 2, 3"]
STOPS = ("h!",)  # hit by one greedy path of the tiny test model; the others fork


def grow(engine, tok):
    """Two levels: 2 children of each prompt (<= 10 tokens), then every unfinished path forks in two (<= 6)."""
    trees = engine.new_trees([encode_prompt(tok, p) for p in PROMPTS])
    engine.extend([(t, 0) for t in trees], 10, 2)
    refs = [(t, l) for t in trees for l in t.leaves() if t[l].finish_reason == "segment"]
    engine.extend(refs, 6, 2)
    return trees


def dump(trees):
    """Per tree, per node: [parent, tokens, finish_reason, logprobs] (JSON-able)."""
    return [[[t[i].parent, list(t[i].token_ids), t[i].finish_reason, list(t[i].logprobs)] for i in range(len(t))] for t in trees]


def shape(trees):
    return [[n[:3] for n in t] for t in dump(trees)]
