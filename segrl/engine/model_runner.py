"""The pool engine's model runner: one decode step of a LLaMA-family decoder over KV pools.

A lean re-implementation of the LLaMA-family decoder layer (LLaMA, SmolLM2, Qwen2, Mistral
without sliding window) that calls the model's own modules (norms, projections, LoRA adapters
included, MLP, rotary embedding), so its log-probs equal the transformers forward (to ~1e-5,
tested). Attention goes through :func:`~segrl.engine.cascade_attention.cascade_attention`
(private tails in a pool window + shared blocks). Other architectures:
:func:`unsupported_reason` says why, and the factory keeps the ``DynamicCache`` engine.

:meth:`LlamaRunner.forward` takes only tensors (no host reads, no data-dependent shapes), so
the same call runs eagerly or captured in a CUDA graph (:mod:`segrl.engine.cuda_graphs`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from .cascade_attention import cascade_attention
from .kv_pool import KVPool

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model) -> str | None:
    """None if the pool engine can decode this model, else why not."""
    base = base_model(model)
    cfg = base.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "sliding_window", None) and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return "sliding-window attention"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        return "not a <Model>ForCausalLM with .model.layers and .lm_head"
    attn = inner.layers[0].self_attn
    if hasattr(attn, "q_norm") or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention layout differs from LLaMA's"
    return None


_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def _rms_norm(norm):
    """A function computing ``norm(x)``: one fused op for a LLaMA-style RMSNorm with fp32
    weights, else the module itself."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None or norm.weight.dtype != torch.float32 or type(norm).__name__ not in _RMS_NORMS:
        return norm
    return functools.partial(torch.nn.functional.rms_norm, normalized_shape=norm.weight.shape, weight=norm.weight, eps=eps)


#: Up to this many rows, :func:`_linear` computes ``(W @ x.T).T`` (see there).
FEW_ROWS = 64


def _linear(layer, bias: torch.Tensor | None = None) -> Callable:
    """A function computing ``x @ W.T + b`` for ``x [R, in]``; ``layer`` is an ``nn.Linear``
    or a weight ``W`` (with ``bias``). For fp32 weights on the CPU and at most
    :data:`FEW_ROWS` rows it computes ``(W @ x.T).T`` (a transposed view): with few rows that
    product streams the weights faster than ``F.linear``'s ``x @ W.T`` (from ~128 rows on
    it is not faster, so not there; the notes in history/). Other modules (LoRA) are called
    as they are."""
    if isinstance(layer, torch.Tensor):
        w, b = layer, bias
    elif type(layer) is torch.nn.Linear:
        w, b = layer.weight, layer.bias
    else:
        return layer
    linear = functools.partial(torch.nn.functional.linear, weight=w, bias=b)
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return linear
    if b is None:
        return lambda x: torch.mm(w, x.t()).t() if x.shape[0] <= FEW_ROWS else linear(x)
    return lambda x: torch.addmm(b[:, None], w, x.t()).t() if x.shape[0] <= FEW_ROWS else linear(x)


class LayerPlan(NamedTuple):
    """What a decode step calls in one decoder layer, looked up once per decode call."""

    norm1: Callable
    qkv: Callable | None  # the fused q/k/v projection, or None: call q/k/v_proj
    attn: torch.nn.Module
    o_proj: Callable
    norm2: Callable
    gate_up: Callable | None  # the fused gate/up projection, or None: call the MLP
    act: Callable | None
    down: Callable | None
    mlp: torch.nn.Module


class LlamaRunner:
    """Decode steps of one LLaMA-family model (see the module docstring)."""

    def __init__(self, model):
        why = unsupported_reason(model)
        if why is not None:
            raise ValueError(f"the KV-pool engine cannot decode this model: {why}")
        base = base_model(model)
        self.inner, self.lm_head = base.model, base.lm_head
        attn = self.inner.layers[0].self_attn
        self.heads = (base.config.num_attention_heads, base.config.num_key_value_heads, attn.head_dim)
        self.scaling = attn.scaling
        w = attn.k_proj.weight
        self.pool_args = (len(self.inner.layers), self.heads[1], self.heads[2], w.dtype, w.device)
        D = self.heads[2]
        self.rot_sign = torch.cat([-torch.ones(D // 2), torch.ones(D - D // 2)]).to(w.device, w.dtype)
        self._fused_cache: dict[int, tuple] = {}
        self.final_norm: Callable | None = None
        self.head: Callable | None = None

    def forward(self, inp, pos, tails: KVPool, put, window: tuple[int, int, int], mask, rows, levels, plan: list[LayerPlan]):
        """Next-token logits ``[R, V]`` of the rows fed ``inp [R]`` at positions ``pos [R]``.

        Each row's new key/value is written at ``put`` (flat indices into a layer's tail pool
        viewed as ``[rows * Hkv * P, D]``, ``R * Hkv`` of them); the row then attends its
        private tail in the pool window ``window = (lo, n, T)`` (rows ``[lo, lo + n)``,
        positions ``[0, T)``, additive ``mask [n, 1, 1, T]``; ``rows [R]``: each row's window
        row, None when row r is window row r) and the shared blocks of ``levels``."""
        Hq, Hkv, D = self.heads
        R = inp.shape[0]
        lo, n, T = window
        x = self.inner.embed_tokens(inp)  # [R, hidden]
        cos, sin = self.inner.rotary_emb(x[:, None], pos[:, None])  # [R, 1, D]
        cos, sin = cos[:, 0, None, :], sin[:, 0, None, :] * self.rot_sign  # rotate_half(x)*sin = roll(x)*sin'
        for li, lp in enumerate(plan):
            h = lp.norm1(x)
            if lp.qkv is not None:
                qkv = lp.qkv(h).contiguous()
            else:
                attn = lp.attn
                qkv = torch.cat([attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)], -1)
            qk = qkv[:, : (Hq + Hkv) * D].view(R, Hq + Hkv, D)
            qk = qk * cos + torch.roll(qk, D // 2, -1) * sin  # rotary embedding of q and k at once
            q = qk[:, :Hq] * self.scaling  # [R, Hq, D]
            K, V = tails.K[li], tails.V[li]
            K.view(-1, D).index_copy_(0, put, qk[:, Hq:].reshape(R * Hkv, D))
            V.view(-1, D).index_copy_(0, put, qkv[:, (Hq + Hkv) * D :].reshape(R * Hkv, D))
            private = (K[lo : lo + n, :, :T], V[lo : lo + n, :, :T], mask, rows)
            o = cascade_attention(q, private, [lv.part(li) for lv in levels])
            x = x + lp.o_proj(o.to(x.dtype).reshape(R, Hq * D))
            h = lp.norm2(x)
            if lp.gate_up is not None:
                g, u = lp.gate_up(h).chunk(2, -1)
                x = x + lp.down(lp.act(g) * u)  # type: ignore[misc]
            else:
                x = x + lp.mlp(h)
        return self.head(self.final_norm(x)).contiguous()

    def weight_ptrs(self) -> tuple[int, ...]:
        """Where the weights a step reads live (a captured graph reads them there)."""
        ptrs = [p.data_ptr() for p in self.inner.parameters()] + [p.data_ptr() for p in self.lm_head.parameters()]
        for _, (qkv, gu) in self._fused_cache.values():
            ptrs += [t.data_ptr() for t in (*(qkv or ()), gu) if t is not None]
        return tuple(ptrs)

    def plan(self) -> list[LayerPlan]:
        """Per layer, the modules and fused weights a decode step uses (once per call: the
        weights do not change while it decodes)."""
        self.final_norm = _rms_norm(self.inner.norm)
        self.head = _linear(self.lm_head)
        plan = []
        for li, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = self._fused(li, layer)
            down = getattr(mlp, "down_proj", None)
            plan.append(LayerPlan(
                _rms_norm(layer.input_layernorm), None if qkv is None else _linear(*qkv),
                attn, _linear(attn.o_proj), _rms_norm(layer.post_attention_layernorm),
                None if gate_up is None else _linear(gate_up), getattr(mlp, "act_fn", None), None if down is None else _linear(down), mlp,
            ))
        return plan

    def _fused(self, li: int, layer):
        """``((W_qkv, b_qkv), W_gate_up)`` concatenated from the layer's plain ``nn.Linear``
        projections (one matrix product instead of three / two per decode step), or None
        where they are wrapped (LoRA) or differ. Refreshed when any weight changes (the
        optimizer's in-place updates bump the tensors' version counters), in place, so that
        a captured CUDA graph keeps reading the fused weights it was captured with."""
        attn, mlp = layer.self_attn, layer.mlp
        lin = torch.nn.Linear
        qkv_mods = (attn.q_proj, attn.k_proj, attn.v_proj)
        gu_mods = (getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None))
        ok_qkv = all(type(m) is lin for m in qkv_mods) and len({m.bias is None for m in qkv_mods}) == 1
        ok_gu = all(type(m) is lin and m.bias is None for m in gu_mods) and hasattr(mlp, "act_fn") and hasattr(mlp, "down_proj")
        params = [p for m in qkv_mods + gu_mods if isinstance(m, torch.nn.Module) for p in m.parameters(recurse=False)]
        key = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._fused_cache.get(li)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            qkv = None
            if ok_qkv:
                b = None if attn.q_proj.bias is None else torch.cat([m.bias for m in qkv_mods])
                qkv = (torch.cat([m.weight for m in qkv_mods]), b)
            gu = torch.cat([m.weight for m in gu_mods]) if ok_gu else None
            if hit is not None:
                qkv, gu = _refresh(hit[1], (qkv, gu))
        self._fused_cache[li] = (key, (qkv, gu))
        return qkv, gu


def _refresh(old, new):
    """``new``'s fused tensors copied into ``old``'s where shapes match (same storage)."""
    (oq, og), (nq, ng) = old, new
    if oq is not None and nq is not None and oq[0].shape == nq[0].shape and (oq[1] is None) == (nq[1] is None):
        oq[0].copy_(nq[0])
        if oq[1] is not None:
            oq[1].copy_(nq[1])
        nq = oq
    if og is not None and ng is not None and og.shape == ng.shape:
        og.copy_(ng)
        ng = og
    return nq, ng
