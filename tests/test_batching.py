"""Micro-batches that encode each distinct context once give the same log-probs and gradients
as encoding every row in full, and the trainer's update is the same either way."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from segrl.algos.logprobs import sequence_logprobs, shared_context_logprobs
from segrl.algos.samples import TrainSample
from segrl.trainer.batching import collate, micro_batches, sort_for_sharing

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).train()


def _samples(seed=0):
    """3 contexts of different lengths x 4 responses of different lengths, shuffled."""
    g = torch.Generator().manual_seed(seed)
    ctxs = [torch.randint(3, 50, (n,), generator=g).tolist() for n in (5, 9, 1)]
    out = []
    for i in range(12):
        n = int(torch.randint(1, 12, (1,), generator=g))
        r = torch.randint(3, 50, (n,), generator=g).tolist()
        out.append(TrainSample(ctxs[i % 3], r, [-1.0] * n, [float(i % 5) - 2] * n, [1] * n, group=i % 3))
    return out


def test_collate_dedupes_contexts_and_full_rows_match():
    s = _samples()
    b = collate(s, pad_id=0)
    assert b.context_ids.shape[0] == 3 and b.response_ids.shape[0] == 12
    ids, attn, C = b.full()
    for row, smp in enumerate(s):
        n = len(smp.context)
        assert ids[row, C - n : C].tolist() == smp.context and attn[row, : C - n].sum() == 0  # left-padded
        r = len(smp.response)
        assert ids[row, C : C + r].tolist() == smp.response and attn[row, C + r :].sum() == 0  # right-padded
    unshared = collate(s, pad_id=0, share_contexts=False)
    assert unshared.context_ids.shape[0] == 12
    assert torch.equal(unshared.full()[0], ids)


def test_shared_context_logprobs_equal_full_rows_values_and_grads(model):
    b = collate(_samples(), pad_id=0)
    ids, attn, C = b.full()
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            lp, ent = shared_context_logprobs(model, b.context_ids, b.context_mask, b.context_index,
                                              b.response_ids, b.response_mask, 0.7, 4)
        else:
            lp, ent = sequence_logprobs(model, ids, attn, C, 0.7, 4)
        m = b.response_mask.float()
        (lp * m * b.adv).sum().backward()
        results.append((lp * m, ent * m, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, e0, g0), (lp1, e1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-5)
    assert torch.allclose(e0, e1, atol=1e-5)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n
    assert lp0.abs().sum() > 0  # not vacuous


def test_sort_for_sharing_keeps_a_context_together():
    s = sort_for_sharing(_samples())
    ctx_order = [tuple(x.context) for x in s]
    # each context forms one contiguous run, responses sorted by length inside it
    runs = [c for i, c in enumerate(ctx_order) if i == 0 or c != ctx_order[i - 1]]
    assert len(runs) == len(set(ctx_order)) == 3
    mbs = micro_batches(s, max_seqs=4)
    assert [len(m) for m in mbs] == [4, 4, 4]
    assert all(len({tuple(x.context) for x in m}) == 1 for m in mbs)


def test_trainer_update_same_with_and_without_sharing(tmp_path):
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    weights = []
    for share in ("true", "false"):
        cfg = load_config(None, {
            "train.share_context_forward": share, "train.micro_batch_size": "5", "train.beta": "0.05",
            "log.output_dir": str(tmp_path / share), "log.progress": "false", "log.report_to": "none",
            "data.num_train": "20", "train.learning_rate": "1e-3",
        })
        tr = Trainer(cfg)
        assert tr.share_contexts is (share == "true")
        m = tr.optimize(_samples())
        weights.append(({n: p.detach().clone() for n, p in tr.model.named_parameters()}, m))
    (w0, m0), (w1, m1) = weights
    assert m0["grad_norm"] > 0 and m0["loss"] == pytest.approx(m1["loss"], abs=1e-5)
    assert m0["kl"] == pytest.approx(m1["kl"], abs=1e-6)
    for n in w0:
        assert torch.allclose(w0[n], w1[n], atol=1e-6), n


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_skipping_zero_advantage_rows_leaves_the_update_unchanged(tmp_path, loss_type):
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    samples = _samples()
    for s in samples[::2]:  # half the rows (+ row 7, already 0): all-zero advantages
        s.advantages = [0.0] * len(s.response)
    out = []
    for skip in ("true", "false"):
        cfg = load_config(None, {
            "train.skip_zero_advantage_rows": skip, "train.loss_type": loss_type, "train.micro_batch_size": "4",
            "train.epsilon_high": "0.28", "train.dual_clip": "3.0", "train.learning_rate": "1e-3",
            "log.output_dir": str(tmp_path / skip), "log.progress": "false", "log.report_to": "none", "data.num_train": "20",
        })
        tr = Trainer(cfg)
        m = tr.optimize(samples)
        out.append(({n: p.detach().clone() for n, p in tr.model.named_parameters()}, m))
    (w0, m0), (w1, m1) = out
    assert m0["train/zero_advantage_rows"] == 7 and m1["train/zero_advantage_rows"] == 0
    assert m0["loss"] == pytest.approx(m1["loss"], abs=1e-6) and m0["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m0["grad_norm"] > 0
    for n in w0:
        assert torch.allclose(w0[n], w1[n], atol=1e-6), n
