"""What ``segrl`` writes when stdout is a log file (nohup, SLURM, CI) rather than a terminal:
one line per step however long, no progress bars (segrl's, transformers' or tqdm's), no
colour codes; and ``segrl eval`` computes exactly the trainer's held-out evaluation."""

from __future__ import annotations

import re

from reliability_helpers import one_torch_thread, reward_file, run_cli, tiny_model_dir, train_args  # noqa: F401  (autouse fixture)

#: tqdm ("50%|#####| 1/2 [00:01<00:01, 1.0it/s]") and rich ("grpo ━━━━ 2/2 0:00:01 ETA 0:00:00") bars
BAR = re.compile(r"it/s\]|\d+%\||ETA \d")


def test_a_log_file_gets_unwrapped_plain_lines_and_no_bars(tmp_path):
    out = tmp_path / ("a-run-directory-whose-name-is-long-enough-to-be-wrapped-at-eighty-columns-" + "x" * 20)
    args = train_args(tiny_model_dir(tmp_path), out, steps=2)
    args[args.index("--log.progress") + 1] = "true"  # the default: a bar on a terminal, none in a file
    r = run_cli(args, COLUMNS="80")  # stdout and stderr are pipes here
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "\x1b[" not in text  # no colour codes
    assert not BAR.search(text), text  # no progress bars
    lines = r.stdout.splitlines()
    assert any(l.startswith("segrl train ") and l.endswith(f"-> {out}") for l in lines), r.stdout  # the run dir on its line
    steps = [l for l in lines if l.startswith("step ")]
    assert len(steps) == 2 and all("reward=" in l and "step_time=" in l for l in steps), r.stdout  # one line per step
    # transformers' "Loading weights" bar is off too (segrl eval loads a model outside the trainer)
    r = run_cli(["eval", "--model", str(tiny_model_dir(tmp_path)), "--eval.num_problems", "2", "--eval.num_samples", "1"])
    assert r.returncode == 0 and not BAR.search(r.stdout + r.stderr), r.stderr


def test_make_console_is_plain_and_unwrapped_off_a_terminal(capsys):
    from segrl.trainer.logging import PLAIN_WIDTH, make_console

    c = make_console()  # pytest captures stdout: not a terminal
    assert c.width == PLAIN_WIDTH and c.soft_wrap and c.color_system is None
    c.print("[bold]step 1[/bold] " + " ".join(f"metric_{i}=0.123" for i in range(30)))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("step 1 metric_0=0.123") and "\x1b" not in out


def test_segrl_eval_agrees_with_the_trainers_evaluation(tmp_path, capsys):
    """Same model, config and seed: `segrl eval` prints the figures training logs before; and
    `segrl eval --model RUN_DIR` (the run's config and final_model/) the ones it logs after."""
    import json

    from segrl.cli import main

    def evaluate(*args):
        assert main(["eval", "--threads", "1", *args]) == 0
        return dict(l.split(": ") for l in capsys.readouterr().out.splitlines() if ": " in l)

    def same(printed, logged):
        assert logged["tokens"] > 0
        for key in ("pass@1", "pass@3", "maj@3", "tokens", "mean_length"):
            assert printed[key] == f"{logged[key]:.4f}", (key, printed, logged)

    model = str(tiny_model_dir(tmp_path))
    common = ["--model.name_or_path", model, "--eval.num_problems", "6", "--eval.num_samples", "3"]
    common += ["--sampling.max_completion_length", "12", "--data.num_train", "64", "--sampling.max_batch_size", "7", "--train.seed", "3"]
    out = tmp_path / "run"
    # a length reward and a large step size: the trained model samples differently from the initial one
    args = ["train", "--threads", "1", *common, "--train.max_steps", "2", "--train.prompts_per_step", "2", "--train.num_generations", "4"]
    args += ["--train.learning_rate", "0.05", "--data.reward_funcs", f"{reward_file(tmp_path)}:length_reward"]
    assert main(args + ["--log.output_dir", str(out), "--log.report_to", "none", "--log.progress", "false"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["tokens"] != summary["after"]["tokens"]
    same(evaluate(*common), summary["before"])
    same(evaluate("--model", str(out)), summary["after"])
