"""`segrl compare`: the token-budget stop, the t-interval, and the whole command in --quick mode."""

import csv
import json
import math

import pytest

from segrl.compare.stats import mean_ci, t975

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----- confidence intervals ---------------------------------------------------------------
def test_t_interval_hand_computed():
    # mean 0.4, s = 0.1, t_{0.975,2} = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.2484
    ci = mean_ci([0.3, 0.4, 0.5])
    assert ci.n == 3
    assert ci.mean == pytest.approx(0.4)
    assert ci.std == pytest.approx(0.1)
    assert ci.half_width == pytest.approx(0.2484, abs=1e-4)
    assert (ci.low, ci.high) == (pytest.approx(0.1516, abs=1e-4), pytest.approx(0.6484, abs=1e-4))
    assert ci.text() == "0.400 ± 0.248"
    # two seeds: t_{0.975,1} = 12.706, s = 0.1 / sqrt(2) -> 12.706 * 0.05 = 0.6353
    assert mean_ci([0.5, 0.6]).half_width == pytest.approx(0.6353, abs=1e-4)
    # five equal values: no spread
    assert mean_ci([0.25] * 5).half_width == 0.0


def test_t_interval_one_seed_and_none():
    one = mean_ci([0.7])
    assert one.mean == 0.7 and one.half_width is None and one.low is None
    assert "n/a" in one.text()
    none = mean_ci([])
    assert none.mean is None and none.text() == "n/a"


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(2) == pytest.approx(4.303, abs=1e-3)
    assert t975(10) == pytest.approx(2.228, abs=1e-3)
    assert t975(50) == pytest.approx(2.009, abs=2e-3)  # table interpolation, exact 2.0086
    assert t975(10**6) == pytest.approx(1.960, abs=1e-3)
    qs = [t975(d) for d in range(1, 200)]
    assert all(a >= b for a, b in zip(qs, qs[1:]))  # decreasing towards the normal quantile
    with pytest.raises(ValueError):
        t975(0)


# ----- the trainer's token budget -------------------------------------------------------
@pytest.fixture
def one_thread():
    # a few tiny steps: 2 threads only add contention on a busy 2-core machine
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_trainer(tmp_path, **over):
    from rich.console import Console

    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    o = {
        "data.num_train": "64",
        "train.prompts_per_step": "2",
        "train.num_generations": "2",
        "sampling.max_completion_length": "16",
        "eval.num_problems": "2",
        "eval.num_samples": "1",
        "log.report_to": "none",
        "log.progress": "false",
        "log.save_rollouts": "false",
        **{k: str(v) for k, v in over.items()},
    }
    return Trainer(load_config(overrides=o), run_dir=tmp_path, console=Console(quiet=True))


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_token_budget_stops_training(tmp_path, one_thread):
    budget = 150
    tr = _tiny_trainer(tmp_path, **{"train.max_steps": 1000, "train.max_generated_tokens": budget, "eval.eval_every_tokens": 50})
    tr.train()
    rows = _rows(tmp_path)
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    assert 1 < len(steps) < 1000
    # stopped by the first step that reached the budget: the one before had not
    total = steps[-1]["tokens/generated"]
    assert total >= budget and total - steps[-1]["tree/decoded_tokens"] < budget
    assert total == sum(r["tree/decoded_tokens"] for r in steps) == tr.generated_tokens
    # every row (steps and evaluations) says where the run stood
    for r in rows:
        assert "tokens/generated" in r and "timing/elapsed_s" in r
    assert [r["tokens/generated"] for r in rows] == sorted(r["tokens/generated"] for r in rows)
    # evaluations: before (0 tokens), after each passed multiple of 50 (one per step at
    # most), and after the last step
    assert evals[0]["step"] == 0 and evals[0]["tokens/generated"] == 0 and evals[0]["timing/elapsed_s"] < 0.5
    assert evals[-1]["step"] == steps[-1]["step"] and evals[-1]["tokens/generated"] == total
    middle = evals[1:-1]
    assert len(middle) >= 1
    by_step = {s["step"]: s["tokens/generated"] for s in steps}
    for r in middle:  # right after the step that crossed a multiple of 50
        assert by_step.get(r["step"] - 1, 0) // 50 < r["tokens/generated"] // 50
    assert evals[-1]["timing/elapsed_s"] >= max(s["timing/elapsed_s"] for s in steps)


def test_token_budget_off_and_step_cap(tmp_path, one_thread):
    # 0 = off: max_steps ends the run; a budget larger than max_steps' worth: max_steps still caps
    for sub, over in (("off", {}), ("cap", {"train.max_generated_tokens": 10**9})):
        tr = _tiny_trainer(tmp_path / sub, **{"train.max_steps": 2, "eval.eval_before": "false", "eval.eval_after": "false", **over})
        tr.train()
        assert tr.step == 2
        assert 0 < tr.generated_tokens < 10**9


def test_token_budget_validated():
    from segrl.configs import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.max_generated_tokens"):
        load_config(overrides={"train.max_generated_tokens": "-1"})
    with pytest.raises(ConfigError, match="eval.eval_every_tokens"):
        load_config(overrides={"eval.eval_every_tokens": "-5"})


# ----- segrl compare --quick --------------------------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `segrl compare --quick` run through the CLI entry point (shared by the tests)."""
    import time

    from segrl.cli import main

    out = tmp_path_factory.mktemp("compare") / "out"
    t0, c0 = time.perf_counter(), time.process_time()
    rc = main(["compare", "--quick", "--threads", "1", "--out", str(out)])
    return out, rc, time.perf_counter() - t0, time.process_time() - c0


def test_compare_quick_outputs(quick):
    from segrl.compare.methods import METHODS, QUICK_BUDGET, QUICK_SEEDS

    out, rc = quick[:2]
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["token_budget"] == QUICK_BUDGET and res["seeds"] == list(QUICK_SEEDS)
    assert res["methods"] == list(METHODS)
    # every method x seed ran, stayed within the budget plus one step, and was evaluated
    # before, along the way and after
    assert len(res["runs"]) == len(METHODS) * len(QUICK_SEEDS)
    for run in res["runs"]:
        assert run["status"] == "ok", run
        assert QUICK_BUDGET <= run["generated_tokens"] <= QUICK_BUDGET + run["max_step_tokens"]
        # before, at least one point along the way, after (a step may cross two evaluation
        # points of the token budget at once, so how many lie between depends on the draws)
        assert len(run["curve"]) >= 3 and 0 < run["curve"][1]["tokens"] < run["generated_tokens"], run["curve"]
        assert run["curve"][0]["step"] == 0 and run["curve"][0]["tokens"] == 0
        assert run["curve"][-1]["step"] == run["steps"] and run["curve"][-1]["tokens"] == run["generated_tokens"]
        assert all(0 <= p["pass@1"] <= 1 for p in run["curve"])
    # the table: one row per method, numbers in range, CIs over 2 seeds
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert r["seeds_ok"] == str(len(QUICK_SEEDS)) and r["status"] == "ok"
        for key in ("pass@1_before", "pass@1_final"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert float(r["ci95_half_width"]) >= 0
        assert math.isclose(float(r["ci95_low"]) + float(r["ci95_high"]), 2 * float(r["pass@1_final"]), abs_tol=1e-9)
        assert QUICK_BUDGET <= float(r["generated_tokens"]) < 2 * QUICK_BUDGET
        assert float(r["train_wall_s"]) > 0
    md = (out / "results.md").read_text()
    for label, _ in METHODS.values():
        assert f"| {label} |" in md
    assert "± 95% CI" in md and "accuracy_vs_tokens.png" in md
    # the plots: two real PNG files
    for name in ("accuracy_vs_tokens.png", "accuracy_vs_time.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    # each run is an ordinary run directory
    run_dir = out / "grpo" / f"seed{QUICK_SEEDS[0]}"
    assert (run_dir / "summary.json").exists() and (run_dir / "final_model").is_dir()


def test_compare_quick_is_quick(quick):
    # one thread: its CPU time is its wall-clock on an idle machine (~30 s on 2 cores); the
    # wall-clock bound is loose because other jobs on a shared machine stretch it
    _, _, wall, cpu = quick
    assert cpu < 60, f"segrl compare --quick used {cpu:.0f} CPU seconds"
    assert wall < 180, f"segrl compare --quick took {wall:.0f} s"


def test_compare_reuse_skips_finished_runs(quick, tmp_path):
    from segrl.compare import run_compare
    from segrl.compare.methods import QUICK_BUDGET

    out = quick[0]
    res = run_compare(["grpo"], [0], QUICK_BUDGET, out, quick=True, reuse=True, threads=1)
    (run,) = res["runs"]
    assert run["status"] == "reused" and run["final"] is not None


def test_compare_reports_a_failed_method_and_runs_the_rest(tmp_path, monkeypatch):
    from segrl.cli import main
    from segrl.trainer.trainer import Trainer

    step = Trainer.train_step

    def broken_for_rloo(self):
        if self.cfg.train.algo == "rloo":
            raise RuntimeError("boom\nsecond line")
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", broken_for_rloo)
    out = tmp_path / "out"
    rc = main(["compare", "--quick", "--methods", "rloo,grpo", "--seeds", "3", "--token-budget", "400", "--evals", "1", "--threads", "1", "--out", str(out)])
    assert rc == 1  # something failed; the outputs are still written
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["grpo"]["status"] == "ok" and 0 <= float(rows["grpo"]["pass@1_final"]) <= 1
    assert rows["grpo"]["ci95_half_width"] == ""  # one seed: no interval
    assert rows["rloo"]["seeds_ok"] == "0" and "failed: RuntimeError: boom" in rows["rloo"]["status"]
    assert "second line" not in rows["rloo"]["status"]
    assert "Traceback" in (out / "rloo" / "seed3" / "error.txt").read_text()
    md = (out / "results.md").read_text()
    assert "CI n/a, 1 seed" in md and "boom" in md
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_rejects_bad_options(tmp_path):
    from segrl.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--methods", "grpo,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["compare", "--token-budget", "-5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["compare", "--set", "nodot", "--out", str(tmp_path)])


def test_compare_table_in_a_log_file_is_not_cut(capsys):
    """Written to a file (not a terminal), the results table keeps its natural width: each
    method one line, no header folded, no colour codes (issue 21: it was cut at 80 columns)."""
    from segrl.compare.table import rich_table
    from segrl.trainer.logging import make_console

    row = {"label": "GRPO with TreePO sampling", "seeds_ok": 3, "seeds": 3, "pass@1_before": 0.364, "ci95_text": "0.540 ± 0.047",
           "generated_tokens": 300123.0, "steps": 101.3, "train_wall_s": 184.2, "status": "ok; every seed finished on time"}
    make_console().print(rich_table([row, {**row, "label": "SPO-tree"}], "held-out pass@1 at 300,000 generated tokens (seeds 0,1,2)"))
    lines = capsys.readouterr().out.splitlines()
    assert "\x1b" not in "".join(lines)
    head = next(l for l in lines if "method" in l)
    assert "final pass@1 ± 95% CI" in head and "gen. tokens" in head and "train s" in head
    for label in ("GRPO with TreePO sampling", "SPO-tree"):
        (line,) = [l for l in lines if label in l]
        assert "0.540 ± 0.047" in line and "300,123" in line and "every seed finished on time" in line
    assert max(len(l) for l in lines) > 80
