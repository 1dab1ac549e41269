"""``segrl`` command line: train, eval, compare, report, view, bench, config, build-default-model.

Every config field can be set with ``--section.field value`` (see ``segrl config``); a YAML
file given with ``--config`` is read first and the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub lookup (~47 s timeout)
# OpenMP threads sleep instead of spinning between parallel regions: on a shared or busy CPU,
# spinning threads made a 2-thread training step ~7x slower than 1 thread (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHORTCUTS = {"--algo": "train.algo", "--model": "model.name_or_path", "--task": "data.task", "--output-dir": "log.output_dir", "--rollout": "train.rollout"}
#: shortcuts that are flags (no value): ``--skip-bad-rows`` = ``--data.skip_bad_rows true``
FLAGS = {"--skip-bad-rows": ("data.skip_bad_rows", "true")}


def _split_overrides(rest: list[str]) -> dict[str, str]:
    """``["--train.lr", "1e-5", "--algo=spo_tree"]`` -> ``{"train.lr": "1e-5", "train.algo": ...}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok in FLAGS:
            key, val = FLAGS[tok]
            out[key] = val
            i += 1
            continue
        if not tok.startswith("--"):
            raise SystemExit(f"segrl: unexpected argument {tok!r} (options look like --section.field value)")
        if "=" in tok:
            key, val = tok.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and not _is_number(rest[i + 1])):
                raise SystemExit(f"segrl: option {tok} needs a value")
            key, val = tok, rest[i + 1]
            i += 2
        key = SHORTCUTS.get(key, key)
        key = key[2:] if key.startswith("--") else key
        if "." not in key:
            raise SystemExit(f"segrl: unknown option --{key} (config options look like --section.field; see 'segrl config')")
        out[key.replace("-", "_")] = val
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _load(args, rest):
    from .configs import ConfigError, load_config

    try:
        return load_config(args.config, _split_overrides(rest))
    except ConfigError as e:
        raise SystemExit(f"segrl: invalid config: {e}") from None


def cmd_train(args, rest) -> int:
    import torch

    if args.resume:
        # Resuming: the run's own settings (from its checkpoint), changed only where allowed;
        # checked before anything is written.
        from .configs import ConfigError
        from .trainer.checkpointing import ResumeError, resume_config

        try:
            cfg = resume_config(args.resume if isinstance(args.resume, str) else None, args.config, _split_overrides(rest))
        except ConfigError as e:
            raise SystemExit(f"segrl: invalid config: {e}") from None
        except ResumeError as e:
            raise SystemExit(f"segrl: ResumeError: {e}") from None
    else:
        cfg = _load(args, rest)
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    from .trainer.trainer import Trainer

    run_dir = args.resume if isinstance(args.resume, str) else None
    from .configs import ConfigError
    from .rewards.combine import RewardError
    from .tasks.math_datasets import DatasetError
    from .trainer.trainer import TrainingError

    try:
        trainer = Trainer(cfg, run_dir=run_dir)
        trainer.console.print(f"[bold]segrl train[/bold] algo={cfg.train.algo} model={cfg.model.name_or_path} task={cfg.data.task} -> {trainer.run_dir}")
        summary = trainer.train(resume=bool(args.resume))
    except ConfigError as e:  # found while building the run (reward_funcs, task name, ...)
        raise SystemExit(f"segrl: invalid config: {e}") from None
    except (DatasetError, FileNotFoundError, TrainingError, RewardError) as e:
        # Expected failures (bad data, broken reward code, diverged training) end with their
        # message, which names the file/row, the field or the reward function's traceback.
        print(f"segrl: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if "interrupted_at_step" in summary:
        return 0
    b, a = summary.get("before", {}), summary.get("after", {})
    if b and a:
        print(f"held-out pass@1: before {b['pass@1']:.3f} -> after {a['pass@1']:.3f} ({100 * (a['pass@1'] - b['pass@1']):+.1f} points)")
    return 0


def cmd_eval(args, rest) -> int:
    import torch

    # `segrl eval --rollout treepo` picks the evaluation sampler (eval.rollout), not train.rollout
    rest = [("--eval.rollout" + r[len("--rollout"):]) if r == "--rollout" or r.startswith("--rollout=") else r for r in rest]
    cfg = _load(args, rest)
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    from .models.loading import load_model_and_tokenizer
    from .tasks.registry import load_task
    from .trainer.evaluate import evaluate

    model, tok = load_model_and_tokenizer(cfg.model)
    task = load_task(cfg.data)
    e = cfg.eval
    sampler = None
    if e.rollout == "treepo":
        from .samplers.treepo import TreePOSampler

        sampler = TreePOSampler(cfg).eval_sampler(e.num_samples)
    res = evaluate(
        model,
        tok,
        task,
        num_problems=e.num_problems,
        k=e.num_samples,
        temperature=cfg.sampling.temperature if e.temperature is None else e.temperature,
        max_new_tokens=cfg.sampling.max_completion_length,
        top_p=cfg.sampling.top_p,
        seed=cfg.train.seed,
        sampler=sampler,
    )
    for k, v in res.as_metrics("").items():
        print(f"{k}: {v:.4f}")
    return 0


def cmd_config(args, rest) -> int:
    from .configs import SegrlConfig, describe

    for name, tp, default, help_ in describe(SegrlConfig):
        print(f"--{name} ({tp}, default {default!r})\n    {help_}")
    return 0


def cmd_compare(args, rest) -> int:
    from .compare import main as compare_main

    return compare_main(rest)


def cmd_report(args, rest) -> int:
    if rest:
        raise SystemExit(f"segrl report: unexpected arguments {rest}")
    from .report import build_report

    try:
        path = build_report(args.run_dir, prompts=args.prompts)
    except FileNotFoundError as e:
        raise SystemExit(f"segrl report: {e}") from None
    print(f"wrote {path} and {path.with_name('trees.html')}")
    return 0


def cmd_view(args, rest) -> int:
    if rest:
        raise SystemExit(f"segrl view: unexpected arguments {rest}")
    from .report import build_tree_view

    try:
        path = build_tree_view(args.run_dir, step=args.step, prompts=args.prompts)
    except FileNotFoundError as e:
        raise SystemExit(f"segrl view: {e}") from None
    print(f"wrote {path}")
    return 0


def cmd_bench(args, rest) -> int:
    from .bench import main as bench_main

    return bench_main(rest)


def cmd_build_default_model(args, rest) -> int:
    from .models.build_default import main as build_main

    return build_main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="segrl",
        description="Segment-level RL for language models: GRPO, RLOO, SPO-chain, SPO-tree, TreePO.",
        epilog="Any config field: --section.field value (list them with 'segrl config').",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in [
        ("train", cmd_train, "train a model (default: GRPO on the embedded arithmetic task and model)"),
        ("eval", cmd_eval, "held-out pass@1 / pass@k / maj@k of a model"),
        ("compare", cmd_compare, "every method at the same budget of generated tokens: table, CIs over seeds, accuracy plots"),
        ("config", cmd_config, "list every config field with its default and meaning"),
        ("report", cmd_report, "(re)build RUN_DIR/report.html: curves, held-out accuracy, sample rollouts, config"),
        ("view", cmd_view, "draw sampled rollout trees of a run as static HTML: RUN_DIR/trees.html"),
        ("bench", cmd_bench, "benchmarks (sampler vs generate, GRPO step vs TRL, ...)"),
        ("build-default-model", cmd_build_default_model, "rebuild the embedded default model reproducibly"),
    ]:
        # compare parses its own options (and --help)
        sp = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False, add_help=name != "compare")
        sp.set_defaults(fn=fn)
        if name in ("train", "eval"):
            sp.add_argument("--config", help="YAML file with config sections")
            sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all)")
        if name in ("report", "view"):
            sp.add_argument("run_dir", metavar="RUN_DIR", help="a segrl train output directory")
            sp.add_argument("--prompts", type=int, default=4, help="trees (prompts) drawn in trees.html (default 4)")
        if name == "view":
            sp.add_argument("--step", type=int, default=None, help="training step whose trees to draw (default: the last saved)")
        if name == "train":
            sp.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR", help="continue a run from its newest intact checkpoint")
    args, rest = p.parse_known_args(argv)
    return args.fn(args, rest)


if __name__ == "__main__":
    sys.exit(main())
