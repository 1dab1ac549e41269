"""``segrl`` command line: train, eval, compare, report, view, bench, config, build-default-model.

Every config field can be set with ``--section.field value`` (see ``segrl config``); a YAML
file given with ``--config`` is read first and the command line wins.

Errors a user can fix (a bad option, a model that is not there, a missing package, CUDA on a
CPU build) end with one line, ``segrl: ...``, and exit status 2; a run that fails on its
data, rewards or training exits with 1; ``--debug`` shows the traceback instead. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models and data are local: never wait on a hub lookup
# OpenMP threads sleep instead of spinning between parallel regions: spinning threads starve
# each other on a shared or busy CPU (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHORTCUTS = {
    "--algo": "train.algo",
    "--model": "model.name_or_path",
    "--task": "data.task",
    "--output-dir": "log.output_dir",
    "--rollout": "train.rollout",
}
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


def _run_config(rest) -> str | None:
    """``segrl eval --model RUN_DIR``: the run's ``config.yaml`` (its task, evaluation settings
    and seed, so that the figures are its "after" ones; options given still win)."""
    model = _split_overrides(rest).get("model.name_or_path")
    run = os.path.expanduser(model) if model else None
    if run and os.path.isfile(os.path.join(run, "config.yaml")) and os.path.isdir(os.path.join(run, "final_model")):
        return os.path.join(run, "config.yaml")
    return None


def _preflight(cfg) -> None:
    """What fails without loading anything: the device, and the packages the config needs."""
    from .errors import require
    from .models.loading import check_device

    check_device(cfg.model.device)
    if cfg.lora.r > 0:
        require("peft", "peft", f"lora.r={cfg.lora.r} (LoRA adapters)", "PEFT")
    if cfg.sampling.backend == "vllm":
        require("vllm", "vllm", "sampling.backend=vllm", "vLLM")


def cmd_train(args, rest) -> int:
    import torch

    if args.resume:
        # Resuming: the run's own settings (from its checkpoint), changed only where allowed;
        # checked before anything is written.
        from .trainer.checkpointing import resume_config

        cfg = resume_config(args.resume if isinstance(args.resume, str) else None, args.config, _split_overrides(rest))
    else:
        cfg = _load(args, rest)
    _preflight(cfg)
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    from .trainer.trainer import Trainer

    # Bad data, broken reward code, a diverged run: main()'s handler prints their one line.
    trainer = Trainer(cfg, run_dir=args.resume if isinstance(args.resume, str) else None)
    what = f"algo={cfg.train.algo} model={cfg.model.name_or_path} task={cfg.data.task}"
    trainer.console.print(f"[bold]segrl train[/bold] {what} -> {trainer.run_dir}")
    summary = trainer.train(resume=bool(args.resume))
    if "interrupted_at_step" in summary:
        return 0
    b, a = summary.get("before", {}), summary.get("after", {})
    if b and a:
        print(f"held-out pass@1: before {b['pass@1']:.3f} -> after {a['pass@1']:.3f} ({100 * (a['pass@1'] - b['pass@1']):+.1f} points)")
    return 0


def cmd_eval(args, rest) -> int:
    import torch

    args.config = args.config or _run_config(rest)
    cfg = _load(args, rest)
    _preflight(cfg)
    torch.set_num_threads(max(1, args.threads or torch.get_num_threads()))
    from .models.loading import load_model_and_tokenizer
    from .tasks.registry import load_task
    from .trainer.evaluate import evaluate_config

    model, tok = load_model_and_tokenizer(cfg.model)
    task = load_task(cfg.data)
    res = evaluate_config(model, tok, task, cfg)  # the trainer's evaluation: same config, same figures
    for k, v in res.as_metrics("").items():
        print(f"{k}: {v:.4f}")
    return 0


def cmd_config(args, rest) -> int:
    from .configs import SegrlConfig
    from .configs.manual import flatten, manual, select
    from .recipes import config_file_data, recipe_defaults

    sections = [f.name for f in dataclasses.fields(SegrlConfig)]
    shown, algo = select(args.names, sections)
    if algo is not None:  # `segrl config spo_tree`: that algorithm's recipe
        rest = ["--train.algo", algo, *rest]
    cfg = _load(args, rest)
    overrides = _split_overrides(rest)
    user = set(overrides) | set(flatten(config_file_data(args.config)))
    print("\n".join(manual(cfg, recipe_defaults(args.config, overrides), user, shown, header="train.algo" in overrides)))
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
        path = build_tree_view(args.run_dir, step=args.step, prompts=args.prompts, strict=True)  # never an empty page
    except FileNotFoundError as e:
        raise SystemExit(f"segrl view: {e}") from None
    print(f"wrote {path}")
    return 0


def cmd_bench(args, rest) -> int:
    from .programs.bench import main as bench_main  # it checks for TRL before any work

    return bench_main(rest)


def cmd_build_default_model(args, rest) -> int:
    from .programs.build_default_model import main as build_main

    return build_main(rest) or 0


MODEL_HELP = "'default' (embedded), a preset (smollm2-135m), a model directory, a run directory or a cached model id"
#: config fields with a short option of their own: (option, field, metavar, help)
COMMON = {
    "train": [
        ("--algo", "train.algo", "ALGO", "grpo | rloo | spo_chain | spo_tree | treepo; also picks that algorithm's recipe (default grpo)"),
        ("--model", "model.name_or_path", "MODEL", MODEL_HELP),
        ("--task", "data.task", "TASK", "arithmetic | gsm8k | math500 | reasoning_gym:NAME | file (a --data.train_file alone means file)"),
        ("--output-dir", "log.output_dir", "DIR", "run directory (default runs/ALGO-TIMESTAMP)"),
        ("--rollout", "train.rollout", "ROLLOUT", "auto (the algorithm's own) | group | treepo | spo_tree | spo_chain: the sampler"),
    ],
    "eval": [
        ("--model", "model.name_or_path", "MODEL", MODEL_HELP),
        ("--algo", "train.algo", "ALGO", "evaluate with that algorithm's recipe (its sampling settings), as training did"),
        ("--task", "data.task", "TASK", "arithmetic | gsm8k | math500 | reasoning_gym:NAME | file"),
        ("--rollout", "eval.rollout", "ROLLOUT", "group | treepo: how evaluation samples are drawn"),
    ],
}
FIELDS_HELP = """config fields:
  Every config field is an option: --section.field VALUE (or --section.field=VALUE), e.g.
    segrl {cmd} --algo spo_tree --train.learning_rate 5e-5 --spo.branch_factors 4,4,4 --eval.num_problems 100
  Lists take commas. 'segrl config' lists every field with its default and meaning,
  'segrl config SECTION' one section (model, data, sampling, train, eval, log, spo, treepo, lora,
  distributed), 'segrl config --algo ALGO' the values that algorithm's recipe sets.
"""


def _add_options(sp, name: str) -> None:
    """Options of a subcommand, the ones a user needs first at the top of its --help."""
    if name in ("train", "eval"):
        for opt, field, metavar, help_ in COMMON[name][:2]:
            sp.add_argument(opt, dest=f"_set_{field}", metavar=metavar, help=f"{help_} (= --{field})")
        sp.add_argument("--config", metavar="FILE", help="YAML file with config sections; options on the command line win over it")
        if name == "train":
            sp.add_argument(
                "--resume", nargs="?", const=True, default=False, metavar="RUN_DIR", help="continue a run from its newest intact checkpoint"
            )
        for opt, field, metavar, help_ in COMMON[name][2:]:
            sp.add_argument(opt, dest=f"_set_{field}", metavar=metavar, help=f"{help_} (= --{field})")
        sp.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: all)")
    if name == "config":
        sp.add_argument(
            "names", nargs="*", metavar="SECTION|ALGO", help="only these sections (spo), or an algorithm's with its recipe (spo_tree)"
        )
        sp.add_argument("--config", metavar="FILE", help="show the values this YAML file sets")
        sp.add_argument("--algo", dest="_set_train.algo", metavar="ALGO", help="the values that algorithm's recipe sets (= --train.algo)")
        sp.add_argument("--task", dest="_set_data.task", metavar="TASK", help="with --algo: the task-specific recipe (= --data.task)")
    if name in ("report", "view"):
        sp.add_argument("run_dir", metavar="RUN_DIR", help="a segrl train output directory")
        sp.add_argument("--prompts", type=int, default=4, help="trees (prompts) drawn in trees.html (default 4)")
    if name == "view":
        sp.add_argument("--step", type=int, default=None, help="training step whose trees to draw (default: the last saved)")
    if name != "compare":
        sp.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of a one-line message")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segrl",
        description="Segment-level RL for language models: GRPO, RLOO, SPO-chain, SPO-tree, TreePO.",
        epilog="Any config field: --section.field value (list them with 'segrl config'). --debug: tracebacks instead of one-line errors.",
    )
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback instead of a one-line message")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in [
        ("train", cmd_train, "train a model (default: GRPO on the embedded arithmetic task and model)"),
        ("eval", cmd_eval, "held-out pass@1 / pass@k / maj@k of a model (the same evaluation as training's before/after)"),
        ("compare", cmd_compare, "every method at the same budget of generated tokens: table, CIs over seeds, accuracy plots"),
        ("config", cmd_config, "list every config field with its default and meaning (one section, or an algorithm's recipe)"),
        ("report", cmd_report, "(re)build RUN_DIR/report.html: curves, held-out accuracy, sample rollouts, config"),
        ("view", cmd_view, "draw sampled rollout trees of a run as static HTML: RUN_DIR/trees.html"),
        ("bench", cmd_bench, "benchmarks: sampler vs generate, GRPO step vs TRL (pip install 'segrl[bench]'), treepo, memory, gpu"),
        ("build-default-model", cmd_build_default_model, "rebuild the embedded default model reproducibly"),
    ]:
        fields = name in ("train", "eval")
        # compare and bench parse their own options (and --help)
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            allow_abbrev=False,
            add_help=name not in ("compare", "bench"),
            epilog=FIELDS_HELP.format(cmd=name) if fields else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            usage=f"segrl {name} [--algo ALGO] [--model MODEL] [--config FILE] {'[--resume [RUN_DIR]] ' if name == 'train' else ''}"
            "[--section.field VALUE ...] [-h]"
            if fields
            else None,
        )
        sp.set_defaults(fn=fn)
        _add_options(sp, name)
    return p


def _shortcut_tokens(args) -> list[str]:
    """``--algo X`` (parsed into ``args._set_train.algo``) -> ``["--train.algo", "X"]``."""
    out = []
    for key, val in vars(args).items():
        if key.startswith("_set_") and val is not None:
            out += [f"--{key[5:]}", val]
    return out


#: exit status of a run that failed on its data, rewards or training (status 2: the command was wrong)
RUN_FAILED = 1
#: (module, class) of errors that end a run which had started: its data, reward code or training
RUN_FAILURES = (
    ("segrl.tasks.rows", "DatasetError"),
    ("segrl.rewards.budget", "RewardError"),
    ("segrl.trainer.trainer", "TrainingError"),
)


def _user_error(e: BaseException) -> tuple[int, str] | None:
    """``(exit status, message)`` for an error the user can fix; ``None`` for a bug."""
    from .configs import ConfigError
    from .errors import SegrlError

    if isinstance(e, ConfigError):
        return 2, f"invalid config: {e}"
    if isinstance(e, SegrlError):
        return 2, str(e)
    # only classes whose module is loaded can have been raised (no heavy imports here)
    failures = tuple(getattr(sys.modules[m], c) for m, c in RUN_FAILURES if m in sys.modules and hasattr(sys.modules[m], c))
    if isinstance(e, (*failures, FileNotFoundError)):
        return RUN_FAILED, f"{type(e).__name__}: {e}"
    return None


class UsageExit(SystemExit):
    """``SystemExit(2)`` whose ``str()`` is the message (already printed): callers of
    :func:`main` in-process see the message, the shell sees status 2."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SEGRL_DEBUG", "0") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    from .trainer.logging import plain_output

    plain_output()  # a log file gets no progress bars (before transformers is imported)
    args, rest = build_parser().parse_known_args(argv)
    rest = _shortcut_tokens(args) + rest
    try:
        return args.fn(args, rest)
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        raise UsageExit(e.code) from None
    except BrokenPipeError:  # `segrl config | head`: the reader is gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print("segrl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        found = _user_error(e)
        if found is None or debug:
            raise
        code, msg = found
        print(f"segrl: {msg}", file=sys.stderr)
        if code == RUN_FAILED:
            return code
        raise UsageExit(f"segrl: {msg}", code) from None


if __name__ == "__main__":
    sys.exit(main())
