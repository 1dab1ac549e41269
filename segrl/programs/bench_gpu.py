"""GPU benchmark: segrl's rollouts, TreePO trees and GRPO iteration against their peers, one GPU.

``segrl bench gpu`` prints, side by side with ratios (and writes ``--json``):

* ``rollout``: the engine training uses (:func:`segrl.engine.registry.make_engine`) against
  ``model.generate``: 64 prompts x 8 samples x 256 new tokens, T = 1, no EOS; tok/s and
  peak memory of each;
* ``treepo``: TreePO tree sampling against independent sampling of the same leaves (64
  prompts x 16 leaves, segments of 64 tokens, a 384-token budget): decoded-token saving,
  wall-clock saving and their ratio (:mod:`segrl.programs.bench_treepo`);
* ``grpo``: one GRPO iteration (16 prompts x 8 x 128 tokens) against TRL's ``GRPOTrainer``
  when trl is installed (else a one-line note); seconds and peak memory of each.

The model is a local model directory (``--model DIR``) or a random-weight model of a named
shape (``--shape``; ``qwen2-1.5b`` is Qwen2-1.5B's shape with a 49k vocabulary, 1.39B
parameters) with a real tokenizer: ``--tokenizer DIR``, else the SmolLM2-135M tokenizer
shipped in ``segrl/models/assets`` (Apache-2.0). Without CUDA it runs the same sections at
the ``tiny`` shape and tiny sizes (a dry run, also what the tests run). Under 5 minutes on
one H200 at the default sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import time
from pathlib import Path

from .bench import load, median_times, rollout_fns, segrl_grpo_seconds, sync, trl_grpo_seconds

#: random-weight model shapes (Qwen2 architecture)
SHAPES = {
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}

#: (GPU sizes, CPU dry-run sizes) per section
SIZES = {
    "rollout": ({"prompts": 64, "samples": 8, "tokens": 256}, {"prompts": 4, "samples": 2, "tokens": 8}),
    "treepo": ({"prompts": 64, "leaves": 16, "segment": 64, "budget": 384}, {"prompts": 2, "leaves": 4, "segment": 4, "budget": 12}),
    "grpo": ({"prompts": 16, "generations": 8, "tokens": 128}, {"prompts": 2, "generations": 2, "tokens": 4}),
}

TOKENIZER_ASSET = Path(__file__).resolve().parents[1] / "models" / "assets" / "smollm2-135m-tokenizer"


def _peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if str(device).startswith("cuda") else None


def _reset_peak(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def write_tokenizer(out: Path, source: str | None = None) -> None:
    """A tokenizer into ``out``: the files of ``source`` (a directory), else the shipped one."""
    if source:
        for f in Path(source).iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json")):
                shutil.copy(f, out / f.name)
        return
    with lzma.open(TOKENIZER_ASSET / "tokenizer.json.xz") as src:
        (out / "tokenizer.json").write_bytes(src.read())
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER_ASSET / name, out / name)


def random_model(shape: str, device: str, dtype: str, tokenizer: str | None = None, root: str | None = None) -> str:
    """A directory holding a random-weight Qwen2 model of ``shape`` and a tokenizer (made once
    per shape, dtype and tokenizer; reused from ``root``, default the system's temp dir)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tag = f"{shape}-{dtype}-" + (hashlib.sha1(str(Path(tokenizer).resolve()).encode()).hexdigest()[:8] if tokenizer else "smollm2")
    out = Path(root or tempfile.gettempdir()) / f"segrl-bench-gpu-{tag}"
    if (out / "config.json").is_file() and any(out.glob("model*.safetensors*")):
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, tokenizer)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    cfg = Qwen2Config(
        vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6, attention_bias=True,
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=pad, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = eos
    model.save_pretrained(str(out))
    return str(out)


def _prompts(tok, n: int) -> list[list[int]]:
    from ..models.loading import encode_prompt
    from ..tasks.arithmetic import make_arithmetic_task

    rows = make_arithmetic_task(n_train=n, n_test=8, seed=0).train
    return [encode_prompt(tok, r["prompt"]) for r in rows[:n]]


def bench_rollout(model, tok, prompts: int, samples: int, tokens: int, repeats: int) -> dict:
    """segrl's engine vs ``model.generate``: tok/s and peak memory of each."""
    device = next(model.parameters()).device
    ours, theirs = rollout_fns(model, tok, _prompts(tok, prompts), samples, tokens)
    peaks = {}

    def peak(name, fn):
        def run():
            _reset_peak(device)
            fn()
            peaks[name] = _peak_gib(device)

        return run

    t_ours, t_gen = median_times([peak("segrl", ours), peak("generate", theirs)], repeats)
    n = prompts * samples * tokens
    return {
        "case": f"{prompts} prompts x {samples} samples x {tokens} tokens", "segrl_tok_s": n / t_ours, "generate_tok_s": n / t_gen,
        "speedup": t_gen / t_ours, "segrl_peak_gib": peaks["segrl"], "generate_peak_gib": peaks["generate"],
    }


def bench_tree(path: str, model, tok, prompts: int, leaves: int, segment: int, budget: int, repeats: int) -> dict:
    """TreePO tree vs independent sampling of the same leaves (:func:`bench_treepo.bench_model`)."""
    from .bench_treepo import bench_model

    device = next(model.parameters()).device
    _reset_peak(device)
    r = bench_model(
        path, prompts=prompts, width=leaves, max_len=budget, segment_length=segment, max_depth=-(-budget // segment), divergence=2,
        initial_width=2, repeats=repeats, max_batch_size=prompts * leaves, seed=0, samplers=("independent", "treepo"), loaded=(model, tok),
    )
    return {
        "case": f"{prompts} prompts x {leaves} leaves, segments of {segment}, budget {budget}",
        "independent_s": r["independent"]["wall"], "tree_s": r["treepo"]["wall"],
        "decoded_token_saving": r["token_saving"], "wall_saving": r["wall_saving"], "saving_ratio": r["saving_efficiency"],
        "peak_gib": _peak_gib(device),
    }


def bench_grpo(path: str, device: str, dtype: str, prompts: int, generations: int, tokens: int, steps: int) -> dict:
    """One GRPO iteration: segrl's Trainer vs TRL's ``GRPOTrainer`` (same model, batch, length)."""
    from ..tasks.arithmetic import make_arithmetic_task

    task = make_arithmetic_task(n_train=2000, n_test=16, seed=0)
    out: dict = {"case": f"{prompts} prompts x {generations} x {tokens} tokens"}
    over = {"model.device": device, "model.dtype": dtype, "train.learning_rate": 1e-6, "log.logging_steps": 10**6}
    _reset_peak(device)
    out["segrl_s"] = segrl_grpo_seconds(path, task, prompts, generations, tokens, steps, [letters], **over)
    out["segrl_peak_gib"] = _peak_gib(device)
    try:
        import trl  # noqa: F401
    except ImportError:
        out["trl"] = "trl not installed: pip install trl to compare with its GRPOTrainer"
        return out
    _reset_peak(device)
    out["trl_s"] = trl_grpo_seconds(path, task, prompts, generations, tokens, steps, [letters], device=device, dtype=dtype)
    out["trl_peak_gib"] = _peak_gib(device)
    out["speedup"] = out["trl_s"] / out["segrl_s"]
    return out


def letters(prompts, completions, **kw) -> list[float]:
    """A reward with variance on random text (the fraction of letters), so updates run."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isalpha() for ch in s) / max(1, len(s)) for s in texts]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def report(res: dict) -> str:
    """The figures as lines of ``name: value`` per section (ratios next to their inputs)."""
    lines = [f"segrl bench gpu: {res['device']} | model {res['model']} ({res['params_m']:.0f}M parameters, {res['dtype']})"]
    keys = {
        "rollout": ("segrl_tok_s", "generate_tok_s", "speedup", "segrl_peak_gib", "generate_peak_gib"),
        "treepo": ("independent_s", "tree_s", "decoded_token_saving", "wall_saving", "saving_ratio", "peak_gib"),
        "grpo": ("segrl_s", "trl_s", "speedup", "segrl_peak_gib", "trl_peak_gib", "trl"),
    }
    for sec, ks in keys.items():
        if sec in res:
            r = res[sec]
            lines.append(f"{sec} ({r['case']}): " + " | ".join(f"{k} {_fmt(r[k])}" for k in ks if k in r))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("USE_HUB_KERNELS", "0")  # transformers' hub kernels need a download
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="segrl bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local model directory (default: a random-weight model of --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model shape (default: qwen2-1.5b on CUDA, tiny on the CPU)")
    p.add_argument("--tokenizer", help="tokenizer directory for the random model (default: the shipped SmolLM2 tokenizer)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--sections", default="rollout,treepo,grpo")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side after a warm-up (treepo: 1)")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    unknown = set(a.sections.split(",")) - {"rollout", "treepo", "grpo", ""}
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)} (rollout, treepo, grpo)")
    import torch

    from ..models.loading import resolve_device, resolve_dtype

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    small = not device.startswith("cuda")
    shape = a.shape or ("tiny" if small else "qwen2-1.5b")
    path = a.model or random_model(shape, device, dtype, a.tokenizer)
    model, tok = load(path, device, dtype)
    res = {
        "device": torch.cuda.get_device_name(device) if not small else "cpu (dry run at tiny sizes)", "dtype": dtype,
        "model": a.model or shape, "params_m": sum(q.numel() for q in model.parameters()) / 1e6,
    }
    size = {k: v[1 if small else 0] for k, v in SIZES.items()}
    sections = [s for s in a.sections.split(",") if s]
    t0 = time.perf_counter()
    if "rollout" in sections:
        res["rollout"] = bench_rollout(model, tok, **size["rollout"], repeats=a.repeats)
    if "treepo" in sections:
        res["treepo"] = bench_tree(path, model, tok, **size["treepo"], repeats=1)
    del model
    sync(device)
    if "grpo" in sections:
        res["grpo"] = bench_grpo(path, device, dtype, **size["grpo"], steps=max(1, a.repeats))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(report(res), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

