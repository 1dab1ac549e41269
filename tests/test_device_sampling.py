"""Sampling where the logits are: the right distribution (chi-square against the softmax at the
temperature, truncated by top-k / top-p, worked out by hand), the right recorded log-probs,
the same draws for a seed on a device, and a decode loop that copies only the sampled ids to
the host (never a ``[rows x vocab]`` tensor)."""

from __future__ import annotations

import math

import pytest
import torch

from segrl.engine.base import SamplingParams
from segrl.engine.cascade_engine import CascadeEngine
from segrl.engine.hf_engine import Engine
from segrl.engine.sampling import sample_tokens

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

P0 = [0.4, 0.3, 0.15, 0.1, 0.05]


def _norm(w):
    s = sum(w)
    return [x / s for x in w]


# (temperature, top_p, top_k, the distribution drawn from, worked out by hand from P0)
CASES = [
    (1.0, 1.0, 0, P0),
    (0.5, 1.0, 0, _norm([p**2 for p in P0])),  # p^(1/T)
    (2.0, 1.0, 0, _norm([p**0.5 for p in P0])),
    (1.0, 1.0, 2, [4 / 7, 3 / 7, 0, 0, 0]),  # the two most likely, renormalised
    (1.0, 0.69, 0, [4 / 7, 3 / 7, 0, 0, 0]),  # mass before the 3rd token = 0.7 >= 0.69: dropped
    (1.0, 0.75, 0, _norm([0.4, 0.3, 0.15, 0, 0])),  # 0.7 < 0.75: the 3rd is kept
    # T, then top-k (0.16, 0.09, 0.0225 of p^2), then top-p over those renormalised (HF's
    # order): the mass before the 3rd is 0.25 / 0.2725 = 0.917 >= 0.9, so it goes too
    (0.5, 0.9, 3, [0.64, 0.36, 0, 0, 0]),
]

#: chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature, top_p, top_k, want", CASES)
def test_draws_follow_the_truncated_softmax(device, temperature, top_p, top_k, want):
    n = 60_000
    logits = (torch.tensor(P0).log() + 1.7).expand(n, -1).contiguous().to(device)  # shift-invariant
    g = torch.Generator(device=device).manual_seed(1)
    tok, lp = sample_tokens(logits, temperature, top_p, top_k, g)
    assert tok.device.type == device and lp.device.type == device  # nothing went to the host
    counts = torch.bincount(tok.cpu(), minlength=5).tolist()
    kept = [i for i, p in enumerate(want) if p > 0]
    assert all(counts[i] == 0 for i in range(5) if want[i] == 0)  # truncated tokens never drawn
    if len(kept) > 1:
        chi2 = sum((counts[i] - n * want[i]) ** 2 / (n * want[i]) for i in kept)
        assert chi2 < CHI2_999[len(kept) - 1], (counts, want)
    # the recorded log-prob: log_softmax(logits / T) of the drawn token, before truncation
    scaled = _norm([p ** (1 / temperature) for p in P0])
    ref = torch.tensor([math.log(scaled[i]) for i in tok.cpu().tolist()])
    assert torch.allclose(lp.cpu().double(), ref.double(), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_same_draws_for_a_seed_on_a_device(device):
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(0)).to(device)
    draws = [sample_tokens(logits, 0.8, 0.95, 50, torch.Generator(device=device).manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    other = sample_tokens(logits, 0.8, 0.95, 50, torch.Generator(device=device).manual_seed(8))[0]
    assert not torch.equal(draws[0], other)


def _host_copies(monkeypatch):
    """Record ``(method, shape, dtype)`` of every tensor turned into Python or numpy values,
    or copied to the host."""
    seen: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name in ("tolist", "item", "numpy", "cpu"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            if self.device.type != "cpu" or _name != "cpu":
                seen.append((_name, tuple(self.shape), self.dtype))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [Engine, CascadeEngine])
def test_a_decode_step_copies_only_the_sampled_ids(tiny_model, char_tok, monkeypatch, device, cls):
    """Per step one copy of the live rows' ids (the step's one synchronisation); the
    log-probs come back once at the end; never a tensor with a vocabulary dimension."""
    V = tiny_model.config.vocab_size
    model = tiny_model.to(device)
    try:
        eng = cls(model, char_tok, SamplingParams(temperature=1.0, ignore_eos=True), seed=0)
        trees = eng.new_trees([[2, 5, 6, 7], [2, 9]])
        seen = _host_copies(monkeypatch)
        eng.extend([(t, 0) for t in trees], 7, 3)
        monkeypatch.undo()
    finally:
        tiny_model.to("cpu")
    assert not any(V in shape for _, shape, _ in seen)
    ids = [shape for name, shape, dt in seen if name == "numpy" and dt == torch.long and shape == (6,)]
    floats = [shape for _, shape, dt in seen if dt.is_floating_point]
    assert len(ids) == 7  # the 6 rows' ids, once per step
    assert floats == [(6 * 7,)]  # the log-probs, once per call
    assert all(len(t[leaf].token_ids) == 7 for t in trees for leaf in t.leaves())
