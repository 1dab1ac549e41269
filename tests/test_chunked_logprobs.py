"""Chunked log-probs (``sequence_logprobs`` with ``chunk_size``) equal the unchunked ones, in
values and in gradients, and never keep a ``[batch x length x vocab]`` tensor for backward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from segrl.algos.logprobs import sequence_logprobs

torch.set_num_threads(2)

V = 1000  # large enough that the logits tensor dominates every activation


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def batch(B=3, L=40, start=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, :5] = 0  # a left-padded row
    if B > 2:
        attn[2, -7:] = 0  # a right-padded row
    return ids, attn, start


def reference(model, ids, attn, start, temperature):
    """Straight from the full logits: log_softmax(logits / T) gathered at the targets."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float() / temperature
    lp = torch.log_softmax(logits[:, start - 1 : -1], -1)
    return lp.gather(-1, ids[:, start:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match_full_logits(model, temperature):
    ids, attn, start = batch()
    ref = reference(model, ids, attn, start, temperature)
    with torch.no_grad():
        for chunk in (0, 1, 5, 16, 64):
            lp, ent = sequence_logprobs(model, ids, attn, start, temperature, chunk)
            m = attn[:, start:].bool()
            assert torch.allclose(lp[m], ref[m], atol=1e-5), chunk
            assert ent.shape == lp.shape and (ent[m] >= -1e-5).all()


def _grads(model, chunk, temperature=0.8):
    ids, attn, start = batch()
    model.zero_grad(set_to_none=True)
    lp, ent = sequence_logprobs(model, ids, attn, start, temperature, chunk)
    w = torch.linspace(-1, 1, lp.numel()).view_as(lp)  # an arbitrary weighting of tokens
    m = attn[:, start:].float()
    loss = (lp * w * m).sum() / m.sum()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, ent.detach()


def test_gradients_match_unchunked(model):
    loss0, g0, e0 = _grads(model, 0)
    for chunk in (3, 16):
        loss, g, e = _grads(model, chunk)
        assert abs(loss - loss0) < 1e-6
        assert g.keys() == g0.keys() and len(g) > 0
        for n in g0:
            assert torch.allclose(g[n], g0[n], atol=1e-6, rtol=1e-4), n
        assert torch.allclose(e, e0, atol=1e-5)


def test_entropy_matches_definition(model):
    ids, attn, start = batch(B=2, L=12, start=4)
    with torch.no_grad():
        _, ent = sequence_logprobs(model, ids, attn, start, 1.0, 4)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, start - 1 : -1]
        p = torch.softmax(logits, -1)
        ref = -(p * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(ent, ref, atol=1e-5)


def _largest_saved(model, chunk):
    """Largest activation (in elements; parameters excluded) autograd keeps for backward."""
    sizes = []
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t):
        if t.data_ptr() not in params:
            sizes.append(t.numel())
        return t

    ids, attn, start = batch(B=4, L=64, start=4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = sequence_logprobs(model, ids, attn, start, 1.0, chunk)
    lp.sum().backward()
    return max(sizes), 4 * 60 * V


def test_chunking_keeps_no_full_logits_for_backward(model):
    big, full = _largest_saved(model, 0)
    assert big >= full  # unchunked: the [B, T, V] logits are saved for backward
    big, full = _largest_saved(model, 8)
    assert big < full / 8  # chunked: only hidden states and per-chunk inputs are saved


def test_peft_wrapped_model_uses_the_same_path(model):
    peft = pytest.importorskip("peft")
    import copy

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_alpha=4))
    ids, attn, start = batch()
    with torch.no_grad():
        a, _ = sequence_logprobs(pm, ids, attn, start, 1.0, 7)
        b, _ = sequence_logprobs(model, ids, attn, start, 1.0, 0)
    assert torch.allclose(a, b, atol=1e-5)  # LoRA B is zero-initialised: same function
