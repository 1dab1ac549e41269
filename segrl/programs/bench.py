"""Benchmarks that print figures side by side: ``segrl bench [sampler|trl|all|treepo|memory|smollm2|gpu]``.

* ``sampler``: our engine (from :func:`segrl.engine.registry.make_engine`, as training uses
  it) against ``model.generate`` on the same model, batch, prompts and lengths (both forced
  to decode exactly ``--new-tokens`` tokens, sampling at T=1), once with 64 distinct prompts
  and once with 8 prompts x 8 samples (where we prefill each prompt once).
* ``trl``: one GRPO iteration (generation + rewards + loss + optimizer step) of segrl against
  TRL's ``GRPOTrainer`` on the same model, task, batch and completion length.
* ``treepo``, ``memory``, ``smollm2``, ``gpu``: the programs of
  :mod:`segrl.programs.bench_treepo`, :mod:`~segrl.programs.bench_memory`,
  :mod:`~segrl.programs.bench_smollm2`, :mod:`~segrl.programs.bench_gpu` (their own options
  follow the name; ``segrl bench gpu --help``).

Timings are wall-clock medians over repeats after a warm-up; the same process runs both (the
sampler cases alternate ours and `generate` run by run, so that a drift of the machine hits both).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

#: ``segrl bench NAME ...`` -> the program module that takes the rest of the command line
PROGRAMS = {
    "treepo": "segrl.programs.bench_treepo",
    "memory": "segrl.programs.bench_memory",
    "smollm2": "segrl.programs.bench_smollm2",
    "gpu": "segrl.programs.bench_gpu",
}


def sync(device) -> None:
    """Wait for the device (timings of asynchronous CUDA work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns``, run in alternation (so that a drift of the
    machine's speed hits all of them alike) after one warm-up call each."""
    for fn in fns:
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [statistics.median(x) for x in ts]


def load(model_name: str, device: str = "cpu", dtype: str = "float32"):
    """``(model in eval mode, tokenizer)`` as training loads them."""
    from ..configs import ModelConfig
    from ..models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=model_name, device=device, dtype=dtype))
    return model.eval(), tok


def rollout_fns(model, tok, prompts: list[list[int]], samples: int, new_tokens: int, max_batch_size: int = 4096):
    """``(ours, generate)``: each decodes ``samples`` x ``new_tokens`` tokens per prompt at
    T=1 with no EOS (our engine from the factory, ``model.generate`` left-padded)."""
    from ..configs import SegrlConfig
    from ..engine.base import SamplingParams
    from ..engine.registry import make_engine

    device = next(model.parameters()).device
    engine = make_engine(SegrlConfig(), model, tok, params=SamplingParams(temperature=1.0, ignore_eos=True), max_batch_size=max_batch_size)

    def ours():
        trees = engine.new_trees(prompts)
        engine.extend([(t, 0) for t in trees], new_tokens, samples)
        engine.release(trees)
        sync(device)

    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt").to(device)

    def theirs():
        with torch.no_grad():
            model.generate(
                **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                num_return_sequences=samples, pad_token_id=tok.pad_token_id,
            )
        sync(device)

    return ours, theirs


def bench_sampler(model_name: str = "default", batch: int = 64, new_tokens: int = 64, repeats: int = 3) -> list[dict]:
    from ..tasks.arithmetic import make_arithmetic_task

    model, tok = load(model_name)
    rows = make_arithmetic_task(n_train=batch, n_test=8, seed=0).train
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    results = []
    for label, n_prompts, n_samples in [(f"{batch} prompts x 1", batch, 1), (f"{batch // 8} prompts x 8", batch // 8, 8)]:
        t_ours, t_gen = median_times(rollout_fns(model, tok, prompts[:n_prompts], n_samples, new_tokens), repeats)
        ntok = n_prompts * n_samples * new_tokens
        results.append({"case": label, "segrl tok/s": ntok / t_ours, "generate tok/s": ntok / t_gen, "speed-up": t_gen / t_ours})
    return results


def segrl_grpo_seconds(model_name: str, task, prompts: int, generations: int, max_len: int, steps: int, reward_funcs=(), **overrides):
    """Median seconds per segrl GRPO iteration after one warm-up iteration."""
    import tempfile

    from ..configs import load_config
    from ..trainer.trainer import Trainer

    cfg = load_config(overrides={
        "model.name_or_path": model_name, "train.prompts_per_step": prompts, "train.num_generations": generations,
        "sampling.max_completion_length": max_len, "train.max_steps": steps + 1, "log.report_to": "none",
        "log.save_rollouts": "false", "log.progress": "false", "data.num_train": 2000, **overrides,
    })
    device = cfg.model.device
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, task=task, reward_funcs=list(reward_funcs), run_dir=d)
        tr.train_step()  # warm-up
        ts = []
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            tr.train_step()
            sync(device)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def trl_grpo_seconds(model_name: str, task, prompts: int, generations: int, max_len: int, steps: int, reward_funcs=(),
                     device="cpu", dtype="float32"):
    """Median seconds per TRL ``GRPOTrainer`` iteration (after the first), same batch and
    length, the task's correctness reward first."""
    import os
    import tempfile

    if device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ..tasks.arithmetic import arithmetic_correctness

    model, tok = load(model_name, device, dtype)
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in task.train])

    def correctness(prompts, completions, answer, **kw):
        return arithmetic_correctness(prompts, completions, answer)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.times = None, []

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    cuda = torch.device(device).type == "cuda"
    with tempfile.TemporaryDirectory() as d:
        args = GRPOConfig(
            output_dir=d, use_cpu=not cuda, bf16=cuda and dtype == "bfloat16", per_device_train_batch_size=prompts * generations,
            gradient_accumulation_steps=1, num_generations=generations, max_completion_length=max_len, temperature=1.0,
            learning_rate=2e-4, beta=0.0, loss_type="dapo", max_steps=steps + 1, logging_steps=1000, report_to="none",
            save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
        )
        funcs = [correctness, *reward_funcs]
        trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
        trainer.train()
    return statistics.median(timer.times[1:])


def bench_trl(model_name: str = "default", prompts: int = 16, generations: int = 8, max_len: int = 64, steps: int = 8) -> dict:
    """Seconds per GRPO iteration, segrl vs TRL GRPOTrainer (same model/task/batch/length)."""
    from ..tasks.arithmetic import make_arithmetic_task

    task = make_arithmetic_task(n_train=2000, n_test=16, seed=0)
    ours = segrl_grpo_seconds(model_name, task, prompts, generations, max_len, steps)
    theirs = trl_grpo_seconds(model_name, task, prompts, generations, max_len, steps)
    batch = f"{prompts}x{generations}"
    return {"segrl s/iter": ours, "TRL s/iter": theirs, "speed-up": theirs / ours, "batch": batch, "max_completion_length": max_len}


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for k in rows[0]:
        t.add_column(k)
    for r in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()])
    Console().print(t)


def _parser(add_help: bool = True) -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="segrl bench", description=__doc__, formatter_class=fmt, add_help=add_help)
    p.add_argument("which", nargs="?", default="all", choices=("sampler", "trl", "all", *PROGRAMS))
    p.add_argument("--model", default="default")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    which = _parser(add_help=False).parse_known_args(argv)[0].which
    if which in PROGRAMS:  # the program parses the whole line but its name (options may come first)
        i = argv.index(which)
        return importlib.import_module(PROGRAMS[which]).main(argv[:i] + argv[i + 1 :]) or 0
    p = _parser()
    a = p.parse_args(argv)
    if a.batch < 8:
        p.error("--batch must be >= 8 (the second case samples batch/8 prompts x 8)")
    if a.which in ("trl", "all"):  # before minutes of work
        from ..errors import require

        require("trl", "bench", "segrl bench trl (a GRPO step against TRL's)", "TRL", hint="`segrl bench sampler` runs without it")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.which in ("sampler", "all"):
        rows = bench_sampler(a.model, a.batch, a.new_tokens, a.repeats)
        print_table(f"sampler vs model.generate ({a.model}, {a.new_tokens} new tokens)", rows)
    if a.which in ("trl", "all"):
        print_table(f"one GRPO iteration: segrl vs TRL GRPOTrainer ({a.model})", [bench_trl(a.model)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
