"""The ``segrl compare`` command: run the grid, then write the table, plots and results.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .methods import COMMON, DEFAULT_BUDGET, DEFAULT_EVALS, DEFAULT_SEEDS, METHODS, QUICK, QUICK_BUDGET, QUICK_SEEDS, STEP_CAP, parse_methods
from .runner import RunResult, as_dict, run_one
from .table import markdown, rich_table, summarize, to_csv


def _count(text: str) -> int:
    """``300000``, ``300k``, ``1.5M`` -> an int."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 300000, 300k, 1.5M)") from None
    if v <= 0 or v != int(v):
        raise argparse.ArgumentTypeError(f"token budget must be a positive integer, got {text!r}")
    return int(v)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return list(dict.fromkeys(seeds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segrl compare",
        allow_abbrev=False,  # --section.field passthrough must never match an option's prefix
        description="Train every method on the same task, model and seeds with the same budget of generated "
        "tokens; write a table of final held-out pass@1 (mean, 95% t-interval over seeds) and plots of "
        "held-out accuracy vs generated tokens and vs wall-clock.",
        epilog="Any config field: --set section.field=value (repeatable) or --section.field value; these win over "
        "the comparison's settings and the algorithms' recipes. Methods: " + ", ".join(f"{k} ({v[0]})" for k, v in METHODS.items()),
    )
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    p.add_argument("--seeds", type=_seeds, default=None, help=f"comma-separated training seeds (default {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--token-budget", type=_count, default=None, help=f"generated tokens per run, e.g. 300k (default {DEFAULT_BUDGET:,})")
    p.add_argument("--evals", type=int, default=DEFAULT_EVALS, help="held-out evaluations inside each run, at evenly spaced fractions of the budget, besides before and after (default %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<timestamp>)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: tiny batches and trees, {QUICK_BUDGET:,}-token budget, seeds {','.join(map(str, QUICK_SEEDS))}, 8 eval problems (under a minute)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs already under --out that used the same settings; run only the rest")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    from ..cli import _split_overrides  # --section.field value, as for segrl train

    try:
        methods = parse_methods(args.methods)
    except ValueError as e:
        p.error(str(e))
    if args.evals < 0:
        p.error("--evals must be >= 0")
    user: dict[str, str] = {}
    for s in args.sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            p.error(f"--set expects section.field=value, got {s!r}")
        k, v = s.split("=", 1)
        user[k.strip()] = v
    user.update(_split_overrides(rest))
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    budget = args.token_budget or (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    result = run_compare(methods, seeds, budget, out, user, threads=args.threads, evals=args.evals, quick=args.quick, reuse=args.reuse, argv=argv)
    return 0 if all(r["status"] in ("ok", "reused") for r in result["runs"]) else 1


def comparison_settings(budget: int, evals: int, quick: bool, user: dict[str, str]) -> dict[str, str]:
    """Overrides shared by every run: the comparison's defaults, the budget, then the user's."""
    return {
        **COMMON,
        **(QUICK if quick else {}),
        "train.max_generated_tokens": str(budget),
        "train.max_steps": str(STEP_CAP),
        "eval.eval_every_tokens": str(budget // (evals + 1) if evals > 0 else 0),
        **user,
    }


def run_compare(
    methods: list[str],
    seeds: list[int],
    budget: int,
    out: Path,
    user: dict[str, str] | None = None,
    threads: int = 0,
    evals: int = DEFAULT_EVALS,
    quick: bool = False,
    reuse: bool = False,
    argv: list[str] | None = None,
    console=None,
) -> dict:
    """Run ``methods`` x ``seeds`` one after another, then write the outputs under ``out``."""
    import torch
    from rich.console import Console

    from ..trainer.logging import make_console

    try:  # before an hour of runs, not after
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("segrl compare: the plots need matplotlib: pip install 'segrl[plots]'") from None
    console = console or make_console()  # a log file: unwrapped lines, the table at its full width
    quiet = Console(quiet=True)  # --quick: one line per run, not the trainer's own output
    threads_before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run_grid(methods, seeds, budget, Path(out), comparison_settings(budget, evals, quick, dict(user or {})), quick, reuse, argv, console, quiet)
    finally:
        torch.set_num_threads(threads_before)  # library use: leave the caller's setting as it was


def _run_grid(methods, seeds, budget, out: Path, settings, quick, reuse, argv, console, quiet) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, list[RunResult]] = {m: [] for m in methods}
    total, i = len(methods) * len(seeds), 0
    stopped = False
    for m in methods:  # seeds inner: a method's runs finish together, so partial results are whole rows
        for seed in seeds:
            i += 1
            run_dir = out / m / f"seed{seed}"
            console.rule(f"[bold]{i}/{total}: {METHODS[m][0]}, seed {seed}[/bold] -> {run_dir}")
            try:
                res = run_one(m, seed, run_dir, settings, quiet if quick else console, reuse=reuse)
            except KeyboardInterrupt:  # a second Ctrl-C during a run: keep what finished
                res = RunResult(m, seed, str(run_dir), "interrupted", "KeyboardInterrupt")
            runs[m].append(res)
            if res.ok:
                b = "n/a" if res.before is None else f"{res.before:.3f}"
                console.print(
                    f"{res.status}: pass@1 {b} -> {res.final:.3f}, {res.generated_tokens:,} tokens in {res.steps} steps, "
                    f"{res.elapsed_s:.0f} s training + {res.eval_s:.0f} s eval ({res.wall_s:.0f} s in all)"
                )
            else:
                console.print(f"[red]{res.status}[/red]: {res.error or ''}")
            if res.status == "interrupted":
                stopped = True
                break
        if stopped:
            console.print("[yellow]interrupted: writing results for the runs that finished[/yellow]")
            break
    result = write_outputs(out, runs, methods, seeds, budget, settings, time.perf_counter() - t0, argv, console)
    return result


def _labels(settings: dict[str, str]) -> dict:
    """Task, model and evaluation size for titles (the settings' values, else the defaults)."""
    from ..configs import load_config

    try:
        cfg = load_config(overrides={k: v for k, v in settings.items() if not k.startswith("train.")})
        return {"task": cfg.data.task, "model": cfg.model.name_or_path, "problems": cfg.eval.num_problems, "samples": cfg.eval.num_samples}
    except Exception:  # noqa: BLE001 - a bad setting already failed every run; titles stay generic
        return {"task": "?", "model": "?", "problems": "?", "samples": "?"}


def write_outputs(out: Path, runs: dict[str, list[RunResult]], methods, seeds, budget, settings, wall_s, argv, console) -> dict:
    rows = [summarize(m, rs) for m, rs in runs.items() if rs]
    lab = _labels(settings)
    seeds_txt = ",".join(map(str, seeds))
    if argv is not None:
        cmd = " ".join(["segrl compare", *argv])
    else:  # library call
        cmd = f"segrl.compare.run_compare(methods={list(methods)}, seeds={list(seeds)}, budget={budget})"
    # the tables first: a plotting failure must not lose an hour of runs
    (out / "results.csv").write_text(to_csv(rows))
    pngs: dict[str, str] = {}
    plot_error = None
    try:
        pngs = _plots(out, runs, lab, seeds, budget)
    except Exception as e:  # noqa: BLE001 - reported, the rest is written
        plot_error = f"{type(e).__name__}: {e}"
        console.print(f"[red]plots failed: {plot_error}[/red]")
    md = (
        f"# segrl compare\n\n`{cmd}`\n\n"
        f"Task `{lab['task']}`, model `{lab['model']}`, seeds {seeds_txt}, budget {budget:,} generated tokens per run; "
        f"final held-out pass@1 over {lab['problems']} problems x {lab['samples']} samples, mean and 95% Student-t "
        f"interval over seeds (n/a with one seed). *gen. tokens*: tokens the rollout engine decoded in training "
        f"(SPO-chain's Monte-Carlo continuations included), *steps*, *train s*: training wall-clock seconds "
        f"(held-out evaluations excluded); means over the seeds that finished. "
        f"Whole comparison: {wall_s:.0f} s ({wall_s / 60:.1f} min).\n\n{markdown(rows)}\n"
        + "".join(f"![accuracy vs {k}]({v})\n\n" for k, v in pngs.items())
        + (f"Plots failed: {plot_error}\n" if plot_error else "")
    )
    (out / "results.md").write_text(md)
    result = {
        "command": cmd,
        "methods": list(methods),
        "seeds": list(seeds),
        "token_budget": budget,
        "settings": settings,
        "task": lab["task"],
        "model": lab["model"],
        "wall_s": wall_s,
        "summary": rows,
        "runs": [as_dict(r) for rs in runs.values() for r in rs],
        "plots": pngs,
        "plot_error": plot_error,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    console.print(rich_table(rows, f"held-out pass@1 at {budget:,} generated tokens ({seeds_txt})"))
    console.print(f"wrote {out / 'results.md'}, results.csv, results.json, {', '.join(pngs.values())} ({wall_s:.0f} s in all)")
    return result


def _plots(out: Path, runs, lab: dict, seeds, budget: int) -> dict[str, str]:
    from .plots import plot_accuracy

    sub = f"{lab['task']} task, {lab['model']} model; {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, budget {budget:,} generated tokens per run"
    ylabel = f"held-out pass@1 ({lab['problems']} problems x {lab['samples']} samples)"
    tok = plot_accuracy(
        runs, "tokens", out / "accuracy_vs_tokens.png", f"Held-out accuracy vs generated tokens\n{sub}",
        "tokens generated in training (all decoded tokens, incl. SPO-chain MC continuations)", ylabel, budget=budget,
    )
    wall = plot_accuracy(
        runs, "elapsed_s", out / "accuracy_vs_time.png", f"Held-out accuracy vs wall-clock\n{sub}",
        "training wall-clock (seconds; held-out evaluations excluded)", ylabel,
    )
    return {"tokens": tok.name, "time": wall.name}
