import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "segrl.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "config", "bench", "build-default-model"):
        assert cmd in r.stdout


def test_config_lists_documented_fields():
    r = run("config")
    assert r.returncode == 0
    assert "--train.num_generations (int, default 8)" in r.stdout
    assert "--train.loss_type" in r.stdout and "dapo" in r.stdout


def test_invalid_config_fails_at_start_naming_the_field():
    r = run("train", "--train.epsilon", "7")
    assert r.returncode != 0
    assert "train.epsilon" in r.stderr
    r = run("train", "--train.bogus", "1")
    assert r.returncode != 0 and "train.bogus" in r.stderr


# ----------------------------------------------------------------------------------------------
# help, `segrl config`, `segrl view`, a train_file (issue 21)
# ----------------------------------------------------------------------------------------------


def test_train_and_eval_help_list_the_options_a_user_needs_first():
    for cmd, opts in (("train", ("--algo", "--model", "--config", "--resume")), ("eval", ("--algo", "--model", "--config"))):
        r = run(cmd, "--help")
        assert r.returncode == 0
        usage = r.stdout.split("\n\n")[0]
        assert all(o in usage for o in opts), usage  # in the usage line, before the option list
        assert "--section.field VALUE" in r.stdout and "segrl config" in r.stdout
        assert f"segrl {cmd} --algo spo_tree --train.learning_rate 5e-5" in r.stdout  # an example of the syntax


def _fields(text):
    return [l.split(" ", 1)[0] for l in text.splitlines() if l.startswith("--")]


def test_config_prints_a_section_or_an_algorithms_recipe():
    r = run("config", "spo")
    assert r.returncode == 0
    names = _fields(r.stdout)
    assert names and all(n.startswith("--spo.") for n in names)
    assert "--spo.branch_factors (list, default [6, 6, 6])" in r.stdout
    # --algo: the recipe's values (segrl/recipes/spo_tree_arithmetic.yaml), every section
    r = run("config", "--algo", "spo_tree")
    assert r.returncode == 0
    assert r.stdout.startswith("# train.algo=spo_tree, data.task=arithmetic: the recipe")
    assert "--spo.branch_factors (list, default [6, 6, 6]; spo_tree recipe: [4, 4, 4])" in r.stdout
    assert "--train.max_steps (int, default 240; spo_tree recipe: 200)" in r.stdout
    assert "--model.name_or_path" in r.stdout
    # an algorithm's name: its section with its recipe; values given on the command line say so
    r = run("config", "spo_tree", "--spo.segment_length", "12")
    assert r.returncode == 0
    assert all(n.startswith("--spo.") for n in _fields(r.stdout))
    assert "spo_tree recipe: [4, 4, 4]" in r.stdout and "--spo.segment_length (int, default 10; given: 12)" in r.stdout
    r = run("config", "ppo")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "neither a section" in r.stderr


def test_view_of_a_step_not_saved_refuses_and_keeps_trees_html(tmp_path):
    from report_helpers import full_tree, write_run

    run_dir = write_run(tmp_path / "run", {1: [full_tree([2, 2])], 3: [full_tree([2, 2])], 4: [full_tree([2, 2])]})
    r = run("view", str(run_dir), "--step", "3")
    assert r.returncode == 0, r.stderr
    before = (run_dir / "trees.html").read_bytes()
    assert b'data-step="3"' in before
    r = run("view", str(run_dir), "--step", "999")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"segrl: {run_dir}: no rollout trees saved for step 999; steps saved: 1, 3-4"]
    assert "wrote" not in r.stdout
    assert (run_dir / "trees.html").read_bytes() == before


def test_a_train_file_alone_means_the_file_task(tmp_path):
    from segrl.configs import ConfigError, load_config

    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q: {a}+2 =\nA:", "answer": str(a + 2)}) + "\n" for a in range(20)))
    assert load_config(None, {"data.train_file": str(f)}).data.task == "file"
    y = tmp_path / "c.yaml"
    y.write_text(f"data:\n  train_file: {f}\n")
    assert load_config(y).data.task == "file"
    assert load_config(None, {"data.train_file": str(f), "data.task": "gsm8k"}).data.task == "gsm8k"  # reads it too
    with pytest.raises(ConfigError, match="data.task=arithmetic reads no file"):
        load_config(None, {"data.train_file": str(f), "data.task": "arithmetic"})
    # `segrl train --data.train_file F` trains on F's prompts
    from reliability_helpers import read_metrics, tiny_model_dir, train_args

    from segrl.cli import main

    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir(tmp_path), out, "--data.train_file", str(f), "--eval.eval_before", "false", steps=1)) == 0
    prompts = {json.loads(l)["row"]["prompt"] for l in (out / "rollouts.jsonl").read_text().splitlines()}
    assert prompts and all(p.startswith("Q: ") and p.endswith("+2 =\nA:") for p in prompts)
    assert read_metrics(out)[0]["step"] == 1
