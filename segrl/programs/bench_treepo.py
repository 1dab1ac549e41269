"""Benchmark: TreePO segment-tree sampling vs independent sampling of the same leaves.

Both samplers run on the same engine settings, the same prompts (the arithmetic task's
held-out rows), the same number of leaves per prompt (``width``) and the same token budget
per trajectory (``max_len``). Reported per sampler: decoded tokens (sampled by the engine),
trajectory tokens (the completions delivered, i.e. what independent sampling decodes),
prefill tokens, wall-clock, trajectories/s, decoded tokens/s and trajectory tokens/s; then
the tree/independent ratios and ``wall saving / decoded-token saving`` (goal >= 0.8: the
decoded-token saving turns into wall-clock saving).

    python -m segrl.programs.bench_treepo                      # embedded model, then smollm2-135m if available
    python -m segrl.programs.bench_treepo --models default --prompts 64 --width 16 --repeats 3

The default batch is RL-sized: 256 prompts x 16 leaves (4,096 trajectories; TreePO's runs
sample 512 x 16 per step) on the embedded model, 64 x 16 on other models, with at most 512
rows decoded at once, so a batch holds several times the rows a step decodes, as in
training. A small batch (``--prompts 64``, ``--other-prompts 16``) leaves the tree's first
rounds with few rows while independent sampling decodes full batches from its first step;
docs/benchmarks.md reports the RL-sized batch; the notes in history/ both.

Timings are medians over ``--repeats`` alternating runs after one full warm-up run of each;
the efficiency is also given paired per repeat (the two samplers of one repeat ran back to
back), which the machine's speed drifting over a run moves less, and from each sampler's
fastest run (what other load on a shared machine disturbed least).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load(name: str, device: str = "cpu", dtype: str = "float32"):
    from .bench import load

    return load(name, device, dtype)


def _available(name: str) -> str | None:
    """None if the model can be loaded, else why not."""
    if name == "default":
        from ..models.default import default_model_path

        p = default_model_path() / "model.safetensors"
        return None if p.is_file() else f"embedded model not built yet ({p} missing)"
    from pathlib import Path

    from ..models import loading

    if Path(name).is_dir():
        return None
    if name not in loading.PRESETS:
        try:
            loading._load_builtin_presets()  # registers the shipped presets
        except Exception:  # noqa: BLE001 - an optional module
            pass
    if name not in loading.PRESETS:
        return f"preset {name!r} not in segrl.models.loading.PRESETS"
    try:
        loading.PRESETS[name]()
    except Exception as e:  # noqa: BLE001 - report any reason the preset cannot be built
        return f"preset {name!r} unavailable: {e}"
    return None


def _encode(tok, prompt: str) -> list[int]:
    try:
        from ..models.loading import encode_prompt

        return encode_prompt(tok, prompt)
    except ImportError:
        return tok(prompt, add_special_tokens=True)["input_ids"]


def _cfg(width: int, max_len: int, segment_length: int, max_depth: int, divergence: int, initial_width: int, max_rows: int | None = None):
    from ..configs import SegrlConfig, TreePOConfig

    cfg = SegrlConfig()
    cfg.sampling.max_completion_length = max_len
    cfg.train.num_generations = width
    cfg.treepo = TreePOConfig(
        segment_length=segment_length, max_depth=max_depth, width=width, divergence=divergence,
        initial_width=initial_width, max_rows_in_flight=max_rows,
    )
    return cfg


#: The samplers compared. 'independent': every prompt's leaves in one engine call on the
#: engine the factory gives (on the CPU the cascade engine: the prompt's KV read once for its
#: samples; what ``segrl train --algo grpo`` uses); 'independent_copy': the same on the copy
#: engine (a DynamicCache row per sample); 'independent_rounds': the same leaves as a
#: degenerate tree (all leaves start at the prompt, one child per path per round) run by the
#: TreePO scheduler, i.e. independent sampling with the tree's continuous batching.
SAMPLERS = ("independent", "independent_copy", "independent_rounds", "treepo")


def _copy_engine(engine, cfg):
    """The copy engine (``sampling.kv_sharing=copy``) on ``engine``'s model, sharing its
    generators and counters (made once per engine)."""
    import copy

    from ..engine.registry import make_engine

    eng = engine.__dict__.get("_copy")
    if eng is None:
        c = copy.deepcopy(cfg)
        c.sampling.kv_sharing = "copy"
        eng = engine._copy = make_engine(c, engine.model, engine.tokenizer, params=engine.params, max_batch_size=engine.max_batch_size)
    eng.generator, eng.device_generator, eng.stats = engine.generator, engine.device_generator, engine.stats
    return eng


def _run(engine, prompt_ids, rows, sampler: str, cfg, seed: int) -> dict:
    import copy

    from ..samplers.group import sample_groups
    from ..samplers.treepo import TreePOSampler
    from .bench import sync

    engine.generator.manual_seed(seed)
    engine.device_generator.manual_seed(seed)
    engine.reset_stats()
    trees = engine.new_trees(prompt_ids, rows)
    t0, c0 = time.perf_counter(), time.process_time()
    if sampler == "treepo":
        TreePOSampler(cfg).grow(engine, trees)
    elif sampler == "independent_rounds":
        flat = copy.deepcopy(cfg)
        flat.treepo.initial_width = flat.treepo.width
        flat.treepo.divergence = 1
        TreePOSampler(flat).grow(engine, trees)
    elif sampler == "independent_copy":
        sample_groups(_copy_engine(engine, cfg), trees, cfg.treepo.width, cfg.sampling.max_completion_length)
    else:
        sample_groups(engine, trees, cfg.treepo.width, cfg.sampling.max_completion_length)
    sync(engine.device)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    st = engine.stats
    leaves = sum(len(t.leaves()) for t in trees)
    traj_tokens = sum(t.independent_equivalent_tokens() for t in trees)
    return {
        "leaves": leaves,
        "decoded": st.decode_tokens,
        "traj_tokens": traj_tokens,
        "prefill": st.prefill_tokens,
        "wall": wall,
        "cpu": cpu,
        "rounds": st.extend_calls,
    }


def _task_prompts(tok, task_name: str, prompts: int):
    """``(task, rows, prompt ids)``: the first ``prompts`` held-out rows of the task."""
    if task_name == "arithmetic":
        from ..tasks.arithmetic import make_arithmetic_task

        task = make_arithmetic_task(n_train=10, n_test=max(prompts, 10), seed=1234)
    else:
        from ..configs import DataConfig
        from ..tasks.registry import load_task

        task = load_task(DataConfig(task=task_name))
    rows = list(task.test)[:prompts]
    return task, rows, [_encode(tok, r["prompt"]) for r in rows]


def bench_model(
    name: str,
    prompts: int = 32,
    width: int = 8,
    max_len: int = 64,
    segment_length: int = 8,
    max_depth: int = 8,
    divergence: int = 2,
    initial_width: int = 2,
    repeats: int = 3,
    max_batch_size: int = 512,
    seed: int = 0,
    task_name: str = "arithmetic",
    engine_kind: str = "auto",
    max_rows: int | None = None,
    samplers: tuple[str, ...] | None = None,
    loaded=None,
) -> dict:
    """Run the samplers in alternation; medians per sampler and tree/independent ratios.

    ``engine_kind``: the engine's ``sampling.kv_sharing`` (``auto``, ``cascade``, ``flat``,
    ``copy``; ``hf`` = ``copy``). ``max_rows``: row capacity (continuous batching over
    prompts for the tree and ``independent_rounds``; static batches of that size for
    ``independent``). ``loaded``: ``(model, tokenizer)`` already loaded (else ``name`` is
    loaded on the CPU). The tree is compared with the faster independent sampler."""
    from ..engine.base import SamplingParams
    from ..engine.registry import make_engine

    model, tok = loaded or _load(name)
    task, rows, prompt_ids = _task_prompts(tok, task_name, prompts)
    kv = "copy" if engine_kind == "hf" else engine_kind
    cfg = _cfg(width, max_len, segment_length, max_depth, divergence, initial_width, max_rows)
    cfg.sampling.kv_sharing = kv
    params = SamplingParams(1.0, 1.0, 0, tuple(task.stop_strings))
    engine = make_engine(cfg, model, tok, params=params, max_batch_size=max_rows or max_batch_size, seed=seed)
    samplers = tuple(samplers or (SAMPLERS if max_rows else ("independent", "independent_copy", "treepo")))
    runs: dict[str, list[dict]] = {s: [] for s in samplers}
    for s in samplers:  # warm-up (not timed): the full batch, so the KV pools reach their size
        _run(engine, prompt_ids, rows, s, cfg, seed)
    for r in range(repeats):
        for s in samplers if r % 2 == 0 else samplers[::-1]:
            runs[s].append(_run(engine, prompt_ids, rows, s, cfg, seed + 1 + r))
    out = {
        "model": name, "engine": engine_kind, "task": task_name, "prompts": prompts, "width": width, "max_len": max_len,
        "segment_length": segment_length, "max_depth": max_depth, "repeats": repeats, "max_rows": max_rows, "samplers": list(samplers),
    }
    return _summarise(out, runs)


def _summarise(out: dict, runs: dict[str, list[dict]]) -> dict:
    """Medians per sampler, and the tree's ratios to the faster independent sampler."""
    for s, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        med["traj_per_s"] = med["leaves"] / med["wall"]
        med["decoded_per_s"] = med["decoded"] / med["wall"]
        med["traj_tokens_per_s"] = med["traj_tokens"] / med["wall"]
        med["walls"] = [x["wall"] for x in rs]
        out[s] = med
    base = min((s for s in runs if s != "treepo"), key=lambda s: out[s]["wall"])
    out["baseline"] = base
    ind, tr = out[base], out["treepo"]
    tok_ratio = tr["decoded"] / ind["decoded"]
    wall_ratio = tr["wall"] / ind["wall"]
    out["decoded_ratio"] = tok_ratio
    out["wall_ratio"] = wall_ratio
    out["cpu_ratio"] = tr["cpu"] / ind["cpu"]
    out["cpu_saving_efficiency"] = (1 - out["cpu_ratio"]) / (1 - tok_ratio) if tok_ratio < 1 else float("nan")
    out["token_saving"] = 1 - tok_ratio
    out["wall_saving"] = 1 - wall_ratio
    out["saving_efficiency"] = (1 - wall_ratio) / (1 - tok_ratio) if tok_ratio < 1 else float("nan")
    # Paired per repeat (both samplers ran back to back): robust to the machine's speed
    # drifting over the minutes of a run, which moves a ratio of medians.
    paired = sorted((1 - t["wall"] / i["wall"]) / (1 - t["decoded"] / i["decoded"]) for i, t in zip(runs[base], runs["treepo"]))
    out["paired_efficiency"] = statistics.median(paired)
    out["paired_efficiency_range"] = (paired[len(paired) // 4], paired[(3 * len(paired) - 1) // 4])
    # Best of the repeats per sampler (timeit's estimator): other load on a shared machine
    # only adds time, so each sampler's fastest run is the least disturbed one.
    best = min(t["wall"] for t in runs["treepo"]) / min(i["wall"] for i in runs[base])
    out["best_wall_ratio"] = best
    out["best_efficiency"] = (1 - best) / (1 - tok_ratio) if tok_ratio < 1 else float("nan")
    out["traj_per_s_ratio"] = tr["traj_per_s"] / ind["traj_per_s"]
    out["traj_tokens_per_s_ratio"] = tr["traj_tokens_per_s"] / ind["traj_tokens_per_s"]
    return out


def format_table(res: dict) -> str:
    samplers = res.get("samplers", ["independent", "treepo"])
    base = res.get("baseline", "independent")
    cap = f"max_rows={res['max_rows']}" if res.get("max_rows") else "all prompts in one batch"
    head = (
        f"model={res['model']} engine={res['engine']} task={res['task']} prompts={res['prompts']} leaves/prompt={res['width']} "
        f"max_len={res['max_len']} segment={res['segment_length']} depth={res['max_depth']} {cap} (median of {res['repeats']})"
    )
    cols = [
        ("leaves", "{:.0f}", "leaves"),
        ("decoded tokens", "{:.0f}", "decoded"),
        ("trajectory tokens", "{:.0f}", "traj_tokens"),
        ("prefill tokens", "{:.0f}", "prefill"),
        ("engine rounds", "{:.0f}", "rounds"),
        ("wall-clock s", "{:.2f}", "wall"),
        ("CPU time s", "{:.2f}", "cpu"),
        ("trajectories/s", "{:.1f}", "traj_per_s"),
        ("decoded tokens/s", "{:.0f}", "decoded_per_s"),
        ("trajectory tokens/s", "{:.0f}", "traj_tokens_per_s"),
    ]
    names = {"independent": "independent", "independent_copy": "indep.copy", "independent_rounds": "indep.rounds", "treepo": "treepo"}
    lines = [head, f"{'':22s}" + "".join(f"{names[s]:>14s}" for s in samplers) + f"{'tree/' + names[base][:7]:>14s}"]
    for label, fmt, k in cols:
        a, b = res[base][k], res["treepo"][k]
        ratio = f"{b / a:.3f}" if a else "-"
        lines.append(f"{label:22s}" + "".join(f"{fmt.format(res[s][k]):>14s}" for s in samplers) + f"{ratio:>14s}")
    lines.append(
        f"vs {base} (the faster independent sampler): decoded-token saving {100 * res['token_saving']:.1f}%, "
        f"wall-clock saving {100 * res['wall_saving']:.1f}% -> wall saving / token saving = {res['saving_efficiency']:.2f} "
        f"(goal >= 0.80); CPU-time saving {100 * (1 - res['cpu_ratio']):.1f}% ({res['cpu_saving_efficiency']:.2f})"
    )
    if "paired_efficiency" in res:
        lo, hi = res["paired_efficiency_range"]
        lines.append(
            f"paired per repeat: wall saving / token saving median {res['paired_efficiency']:.2f} (quartiles {lo:.2f}-{hi:.2f}); "
            + (f"best run of each: {res['best_efficiency']:.2f}; " if "best_efficiency" in res else "")
            + "wall-clock s per repeat: "
            + "; ".join(f"{names[s]} " + " ".join(f"{w:.2f}" for w in res[s]["walls"]) for s in (base, "treepo"))
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segrl.programs.bench_treepo", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="default,smollm2-135m", help="comma-separated model names (unavailable ones are skipped)")
    p.add_argument("--prompts", type=int, default=256, help="prompts for the embedded model (x --width leaves: an RL-sized batch)")
    p.add_argument("--width", type=int, default=16, help="leaves per prompt (both samplers; 16 = the paper's width)")
    p.add_argument("--max-len", type=int, default=64, help="token budget per trajectory (both samplers)")
    p.add_argument("--segment-length", type=int, default=8)
    p.add_argument("--max-depth", type=int, default=0, help="default: ceil(max_len / segment_length)")
    p.add_argument("--divergence", type=int, default=2)
    p.add_argument("--initial-width", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--other-prompts", type=int, default=0, help="prompts for models other than 'default' (0 = --prompts // 4)")
    p.add_argument("--other-samplers", default="independent,treepo", help="samplers for models other than 'default'")
    p.add_argument("--other-max-len", type=int, default=0, help="max_len for models other than 'default' (0 = --max-len)")
    p.add_argument("--other-task", default="gsm8k", help="prompts for models other than 'default' (which uses arithmetic)")
    p.add_argument("--other-segment-length", type=int, default=0, help="segment length for models other than 'default'")
    p.add_argument("--other-repeats", type=int, default=3, help="repeats for models other than 'default' (0 = --repeats)")
    kinds = ["auto", "cascade", "flat", "copy", "hf"]
    p.add_argument("--engine", default="auto", choices=kinds, help="the engine's sampling.kv_sharing (hf = copy)")
    p.add_argument("--max-rows", type=int, default=0, help="row capacity per engine round (0 = all prompts in one batch)")
    p.add_argument("--samplers", default="", help=f"comma-separated subset of {','.join(SAMPLERS)}")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    results = []
    for name in [m for m in a.models.split(",") if m]:
        why = _available(name)
        if why:
            print(f"[skip] {name}: {why}\n")
            continue
        big = name != "default"
        prompts = (a.other_prompts or max(1, a.prompts // 4)) if big else a.prompts
        max_len = (a.other_max_len or a.max_len) if big else a.max_len
        seg = (a.other_segment_length or a.segment_length) if big else a.segment_length
        depth = a.max_depth or -(-max_len // seg)
        repeats = (a.other_repeats or a.repeats) if big else a.repeats
        task = a.other_task if big else "arithmetic"
        samplers = a.other_samplers if big and not a.samplers else a.samplers
        chosen = tuple(x for x in samplers.split(",") if x) or None
        res = bench_model(
            name, prompts, a.width, max_len, seg, depth, a.divergence, a.initial_width, repeats, a.max_batch_size, a.seed, task, a.engine,
            a.max_rows or None, chosen,
        )
        results.append(res)
        print(format_table(res) + "\n", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
