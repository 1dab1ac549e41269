import subprocess
import sys


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
